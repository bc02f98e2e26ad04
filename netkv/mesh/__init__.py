"""Parts of `netkv up`: its child processes, the demo and its emulated fabric."""
