"""The trace-driven discrete-event simulator behind ``netkv sim``.

Modules: ``trace`` (strict Mooncake JSONL loader), ``scenario`` (the cluster and its models,
from a YAML file), ``fabric`` (KV transfers as max-min fair flows plus background hot spots),
``telemetry`` (what policies see of the network), ``simulation`` (the event loop),
``report`` (tables, summary JSON, plots), ``sweep`` (parameter sweeps), ``cli``.
"""
