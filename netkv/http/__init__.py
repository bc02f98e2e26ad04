"""The HTTP edge shared by every NetKV server (scheduler, oracle API, P/D proxy).

One concept per module:

* :mod:`netkv.http.bodies`: typed bodies: :func:`read_body` decodes a JSON body straight into a
  msgspec Struct (errors name the field, ``body.prompt_tokens``), :func:`json_response`;
* :mod:`netkv.http.middlewares`: :func:`middlewares` (errors as JSON for every status, 404 and
  405 too; bearer auth on mutating methods; JSON-only bodies, else 415; body size limit);
* :mod:`netkv.http.server`: :class:`HttpLimits` (and :class:`HttpLimitsSettings`, the same
  limits as settings fields for a service's settings) and :func:`serving`, a server with header,
  body and idle timeouts and a connection cap (slowloris and idle floods cannot starve it);
* :mod:`netkv.http.h1`: a lean HTTP/1.1 server (httptools on an asyncio Protocol) with the same
  limits, the P/D proxy's default front (``--front h1``; aiohttp's stays as ``--front aiohttp``);
* :mod:`netkv.http.openapi`: the OpenAPI document generated from the body Structs;
* :mod:`netkv.http.ratelimit`: :class:`RateLimitedLog`, error logs that cannot flood a disk.
"""
