"""The one check of a run's command line, before anything starts: ``precheck(argv)`` composes the
configuration exactly as bench/run.py's Hydra entry will and validates it (``RunConfig``), returning one line
for anything invalid. bench/run.py calls it on every rank before Hydra's runner; the tools that launch runs
(``python -m bench.tune``) call it on the command lines they are about to start, before any probe."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from bench.harness.config import ConfigError, register_configs, to_run_config

CONF = Path(__file__).resolve().parents[1] / "conf"  # bench/conf: config.yaml, strategy/*.yaml

_HYDRA_FLAGS = ("-h", "--help", "--hydra-help", "--cfg", "-c", "--info", "--resolve", "--package", "-p",
                "--multirun", "-m", "--shell-completion", "-sc", "--config-path", "-cp", "--config-name", "-cn",
                "--config-dir", "-cd", "--run", "-r", "--experimental-rerun")


def precheck(argv: list[str]) -> str | None:
    """Compose and validate the configuration exactly as ``main`` will, before Hydra's runner starts, and
    return a one-line message for anything invalid (an unknown group option or key, a value of the wrong
    type, a RunConfig check), or None. Hydra itself would exit 1 with a multi-line report."""
    if any(a.split("=", 1)[0] in _HYDRA_FLAGS for a in argv):
        return None  # --help, --cfg, multirun ...: Hydra's own business
    register_configs()  # the schema and the model presets (idempotent)
    from hydra import compose, initialize_config_dir
    from hydra.errors import MissingConfigException

    overrides = [a for a in argv if not a.startswith(("hydra.", "hydra/", "+hydra", "~hydra"))]
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base=None):
            raw = compose(config_name="config", overrides=overrides)
    except MissingConfigException as exc:
        group = next((g for g in ("model", "strategy") if f"'{g}/" in str(exc)), None)
        if group is None:
            return str(exc).splitlines()[0]
        value = next((a.split("=", 1)[1] for a in reversed(argv) if a.startswith(f"{group}=")), "?")
        valid = [o for o in exc.options or [] if o != "base_strategy"]  # the schema node, not a preset
        return f"{group}={value!r} is not a {group} preset; valid: {', '.join(valid)}"
    except Exception as exc:  # OmegaConf type errors, override grammar errors
        from hydra.core.override_parser.overrides_parser import OverridesParser

        parser = OverridesParser.create()
        for arg in overrides:  # a grammar error: name the override
            try:
                parser.parse_override(arg)
            except Exception as bad:
                return f"cannot parse override {arg!r}: {' '.join(str(bad).split())}"
        root = exc
        while root.__cause__ is not None:
            root = root.__cause__
        with initialize_config_dir(config_dir=str(CONF), version_base=None):
            unknown = _unknown_key(root, compose(config_name="config"))
        if unknown:
            return unknown
        first = " ".join(str(exc).split("\n")[0].split())
        why = " ".join(str(root).split("\n")[0].split())
        return f"{first}: {why}" if root is not exc else first
    try:
        to_run_config(raw)
    except ConfigError as exc:
        return str(exc)
    return None


def _unknown_key(exc: BaseException, raw_default) -> str | None:
    """Hydra's "Could not override 'x'" for a key that is not in the schema, as one line naming the valid keys."""
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    if not isinstance(exc, ConfigAttributeError | ConfigKeyError) or not getattr(exc, "full_key", None):
        return None
    key = exc.full_key
    prefix, _, _ = key.rpartition(".")
    node = OmegaConf.select(raw_default, prefix) if prefix else raw_default
    if not isinstance(node, DictConfig):
        return None
    scope = f"{prefix} " if prefix else "top-level "
    return f"unknown key {key!r}; valid {scope}keys: {', '.join(sorted(node.keys()))}"
