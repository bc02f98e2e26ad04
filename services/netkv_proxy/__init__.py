"""``netkv proxy``: an OpenAI-compatible P/D proxy that places each decode with NetKV."""
