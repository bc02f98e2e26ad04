"""Every message between NetKV processes, one typed definition each (msgspec Structs).

Modules: ``names`` (Redis keys, MQTT topics), ``fields`` (bounded field types shared by the
contracts), ``errors`` (the one error type and how msgspec's errors become field names and
metric reasons), ``samples`` and ``wire`` (the agent -> Redis stream -> oracle sample batch),
``registration`` (an agent's registry entry), ``snapshot`` (the published congestion map) and
``announcement`` (the map-version message on MQTT). Import from the modules themselves; this
package re-exports nothing.
"""
