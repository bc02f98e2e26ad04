"""Typed, frozen settings shared by the services, loaded once at start-up (pydantic-settings).

A config file (YAML or JSON) has top-level sections: the shared ``redis`` and ``mqtt``
endpoints, ``topology`` (a path), and one section per service (``agent``, ``oracle``,
``scheduler``). :func:`load_settings` merges the shared sections into the service's section,
applies ``NETKV_*`` environment variables (prefix ``NETKV_``, nested delimiter ``__``:
``NETKV_REDIS__URL``) and CLI overrides, and validates the lot once. Precedence, lowest first:
file, environment, flags. Nothing below the CLI reads ``os.environ``: the environment is
passed in as a mapping, and building a settings class directly (tests, benchmarks) reads only
its arguments.

Fail closed: unknown fields (file) and unknown ``NETKV_*`` variables are errors naming them;
an empty secret is an error wherever it comes from; secrets are :class:`~pydantic.SecretStr`,
so no ``repr`` or log line shows them. Every error is an :class:`~netkv.errors.InputError`
whose ``where`` names the variable, or the file and the field path, once.

Policy parameters and the pure core's types stay plain dataclasses (:mod:`netkv.fields`): the
core does not depend on a config library.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from netkv.core.kvsize import PRESETS
from netkv.core.policies import policy_names
from netkv.errors import InputError
from netkv.yamlfile import read_yaml

S = TypeVar("S", bound="ServiceSettings")

ENV_PREFIX = "NETKV_"
SHARED_SECTIONS = ("redis", "mqtt", "topology")
LogLevel = Literal["debug", "info", "warning", "error"]
Port = Annotated[int, Field(ge=0, le=65535)]


def _known_model(model: str) -> str:
    if model not in PRESETS:
        raise ValueError(f"unknown model {model!r}; known: {', '.join(sorted(PRESETS))}")
    return model


def _known_policy(policy: str) -> str:
    if policy not in policy_names():
        raise ValueError(f"unknown policy {policy!r}; known: {', '.join(policy_names())}")
    return policy


ModelName = Annotated[str, AfterValidator(_known_model)]  # a model preset's name
PolicyName = Annotated[str, AfterValidator(_known_policy)]  # a registered policy's name

# NETKV_* variables that are not settings of a service (scripts, compose files, the demo).
OTHER_VARIABLES = frozenset({
    "NETKV_TRACE", "NETKV_TRACE_DIR", "NETKV_BASE_IMAGE", "NETKV_SCHEDULER_PORT",
    "NETKV_REQUIRE_COMPOSE", "NETKV_BACKGROUND_FLOWS", "NETKV_TESTBED_STATE",
    "NETKV_REQUESTS", "NETKV_POLICIES",
})


Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]


class KvSizeSettings(BaseModel):
    """The KV bytes a transfer moves per prompt token, as settings fields (the scheduler's
    and the proxy's mix it in): ``model``'s preset, unless ``kv_bytes_per_token`` overrides
    it (a quantised cache, or a testbed that scales bytes with its link rates)."""

    model: ModelName = "llama3-70b"
    kv_bytes_per_token: Positive | None = None

    @property
    def bytes_per_token(self) -> float:
        """KV bytes a transfer moves per prompt token (the override, else the preset's)."""
        if self.kv_bytes_per_token is not None:
            return float(self.kv_bytes_per_token)
        return float(PRESETS[self.model].bytes_per_token)


def reveal(secret: SecretStr | None) -> str | None:
    """The plain value of a secret, for the one call that hands it to a client library."""
    return None if secret is None else secret.get_secret_value()


def _not_empty_secret(value: SecretStr | None) -> SecretStr | None:
    if value is not None and not value.get_secret_value():
        raise ValueError("must not be empty (leave the setting out instead)")
    return value


def input_error(exc: ValidationError, where: Callable[[tuple[str | int, ...]], str]) \
        -> InputError:
    """The first error of ``exc`` as an InputError; ``where(loc)`` names its place."""
    err = exc.errors(include_url=False)[0]
    loc: tuple[str | int, ...] = tuple(err["loc"])
    cause = (err.get("ctx") or {}).get("error")
    if isinstance(cause, InputError):  # a cross-field check that names its own field
        loc = (*loc, *cause.where.split("."))
        message = cause.message
    else:
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = "unknown field"
    return InputError(where(loc), message)


def dotted(loc: tuple[str | int, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


class Section(BaseModel):
    """A frozen, strict-keyed settings section (``redis``, ``mqtt``, nested tables)."""

    # No custom __init__ here: pydantic would call it for every nested value it validates.
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerLogin(Section):
    """How a client logs in to a server: user, password (a secret) and TLS (``ca_file`` to
    trust a private CA, ``cert_file``/``key_file`` for a client certificate). Shared by the
    Redis and MQTT sections."""

    username: str | None = None
    password: SecretStr | None = None
    tls: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    _password = field_validator("password")(_not_empty_secret)


class RedisSettings(ServerLogin):
    """Where the telemetry store is and how to log in. ``prefix`` starts every key."""

    url: str = "redis://127.0.0.1:6379/0"
    prefix: str = "netkv:"
    timeout_s: float = Field(default=2.0, gt=0, allow_inf_nan=False)

    @field_validator("url")
    @classmethod
    def _scheme(cls, url: str) -> str:
        if not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"must start with redis://, rediss:// or unix://, got {url!r}")
        return url

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, prefix: str) -> str:
        if not prefix or not prefix.endswith(":"):
            raise ValueError(f"must be non-empty and end with ':', got {prefix!r}")
        return prefix


class MqttSettings(ServerLogin):
    """Where the event bus is and how to log in. ``prefix`` starts every topic."""

    host: str = "127.0.0.1"
    port: int = Field(default=1883, ge=1, le=65535)
    prefix: str = "netkv/v1/"
    keepalive_s: int = Field(default=10, ge=1)

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, prefix: str) -> str:
        if not prefix.endswith("/") or any(c in prefix for c in "+#"):
            raise ValueError(f"must end with '/' and hold no wildcards, got {prefix!r}")
        return prefix


class ServiceSettings(BaseSettings):
    """Base of a service's settings: ``NETKV_`` prefix, ``__`` nesting, frozen, no extras.

    Built directly, it reads only its arguments (no environment, no file); use
    :func:`load_settings` for the real start-up path.
    """

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_nested_delimiter="__",
                                      extra="forbid", frozen=True, env_ignore_empty=False,
                                      case_sensitive=False, validate_default=False)
    SECTION: ClassVar[str] = ""

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise input_error(exc, lambda loc: dotted(loc) or self.SECTION) from None

    @classmethod
    def settings_customise_sources(
        cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)


class _MappingEnvSource(EnvSettingsSource):
    """The environment source over a given mapping (not ``os.environ``); a list-valued
    setting also takes comma-separated text (``NETKV_NICS=eth0,eth1``)."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        self._environ = dict(environ)
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        # case_sensitive is off (ServiceSettings): names are matched in lower case.
        return {k.lower(): v for k, v in self._environ.items()}

    def decode_complex_value(self, field_name: str, field: FieldInfo, value: Any) -> Any:
        if isinstance(value, str) and not value.lstrip().startswith(("[", "{")):
            origin = getattr(field.annotation, "__origin__", None)
            if origin in (tuple, list):
                return [p.strip() for p in value.split(",") if p.strip()]
        try:
            return super().decode_complex_value(field_name, field, value)
        except (ValueError, json.JSONDecodeError):
            raise ValueError(f"not valid JSON: {value[:64]!r}") from None


def env_names(cls: type[BaseModel], prefix: str = ENV_PREFIX) -> set[str]:
    """Every ``NETKV_*`` name that sets a field of ``cls`` (nested: ``..._SECTION__FIELD``)."""
    names: set[str] = set()
    for name, info in cls.model_fields.items():
        var = f"{prefix}{name.upper()}"
        names.add(var)
        tp = info.annotation
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            names |= env_names(tp, f"{var}__")
    return names


def check_environment(cls: type[ServiceSettings], env: Mapping[str, str]) -> None:
    """Refuse ``NETKV_*`` variables that set nothing (a typo must not pass silently)."""
    known = env_names(cls) | OTHER_VARIABLES
    for name in sorted(env):
        if name.upper().startswith(ENV_PREFIX) and name.upper() not in known:
            raise InputError(name, f"unknown setting for `netkv {cls.SECTION}`; known: "
                             f"{', '.join(sorted(env_names(cls)))[:600]}")


def read_config_file(path: str | Path | None) -> dict[str, Any]:
    """The raw mapping in a config file (empty when no file is given)."""
    if path is None:
        return {}
    path = Path(path)
    data = read_yaml(path, "config file")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InputError(str(path), "the config file must hold a mapping of sections")
    return data


def load_settings(
    cls: type[S], section: str, path: str | Path | None, env: Mapping[str, str],
    overrides: Mapping[str, Any] | None = None,
) -> S:
    """Build a service's settings from file section + shared sections + env + CLI overrides.

    Precedence, lowest first: the file, then ``NETKV_*`` variables, then ``overrides`` (flags
    the user typed; ``None`` means not given). Errors name the variable, or the file and the
    field.
    """
    data = read_config_file(path)
    body = data.get(section) or {}
    if not isinstance(body, dict):
        raise InputError(f"{path}: {section}", "must be a mapping")
    shared = {k: v for k, v in data.items()
              if k in SHARED_SECTIONS and k in cls.model_fields and k not in body}
    from_file = shared | body
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    env = {k: v for k, v in env.items() if k.upper().startswith(ENV_PREFIX)}
    check_environment(cls, env)
    upper_env = {k.upper() for k in env}

    def where(loc: tuple[str | int, ...]) -> str:
        names = [str(p).upper() for p in loc if not isinstance(p, int)]
        for i in range(len(names), 0, -1):
            var = ENV_PREFIX + "__".join(names[:i])
            if var in upper_env and (not loc or loc[0] not in given):
                return var
        if loc and loc[0] in given:
            return f"{section}.{dotted(loc)}"
        place = dotted(loc) if loc and loc[0] in shared else f"{section}.{dotted(loc)}"
        return f"{path}: {place}" if path else place

    class _Loaded(cls):  # type: ignore[valid-type,misc]
        def __init__(self, **values: Any) -> None:
            # Without ServiceSettings' translation: the error is named below, by its source.
            BaseSettings.__init__(self, **values)

        @classmethod
        def settings_customise_sources(
            cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            return (init_settings, _MappingEnvSource(settings_cls, env),
                    InitSettingsSource(settings_cls, from_file))

    try:
        loaded = _Loaded(**given)
    except ValidationError as exc:
        raise input_error(exc, where) from None
    except ValueError as exc:  # an env value that is not valid JSON
        raise InputError(section, str(exc)) from None
    # The validated values as the class itself (not the loader subclass).
    return cls.model_construct(_fields_set=loaded.model_fields_set,  # type: ignore[return-value]
                               **{k: getattr(loaded, k) for k in cls.model_fields})
