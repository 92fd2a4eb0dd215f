"""Pure planning functions: no I/O, no clocks but the ones handed in."""
