"""The pure decision core: topology, KV sizing, network cost oracles and policies.

Nothing in here does I/O; the services, the simulator and the testbeds share these objects.
"""
