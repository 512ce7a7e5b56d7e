"""Typed, frozen configuration: params.yaml grouped by stage, presets, overrides, validation (see schema)."""

from repro.config.schema import *  # noqa: F401,F403
