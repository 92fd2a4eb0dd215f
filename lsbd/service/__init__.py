"""Services above the engine: what commands and front ends ask of a volume
as a whole (its running writer, the devices a server opens)."""
