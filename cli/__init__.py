"""The `moe-offload` command line (thin: parse, call the library, print)."""
