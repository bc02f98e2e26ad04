"""The one TLS client context NetKV's adapters build (Redis, MQTT): the system's trust store
or ``ca_file``, and a client certificate when one is configured."""

from __future__ import annotations

import ssl


def client_context(ca_file: str | None, cert_file: str | None = None,
                   key_file: str | None = None) -> ssl.SSLContext:
    """A verifying client context (hostname checks on)."""
    context = ssl.create_default_context(cafile=ca_file)
    if cert_file:
        context.load_cert_chain(cert_file, key_file)
    return context
