"""Typed, frozen configuration: params.yaml grouped by stage (schema), presets, overrides and loading (load), and
errors that name the field and the fix (errors)."""

from repro.config.errors import ConfigError
from repro.config.load import (
                               OMIT_WHEN_EMPTY,
                               apply_overrides,
                               config_from_dict,
                               config_hash,
                               dump_yaml,
                               load_config,
                               preset_dict,
                               preset_names,
                               preset_text,
                               stage_dict,
                               to_dict,
)
from repro.config.schema import (
                               EXTRA_METRICS,
                               GUIDANCE_VARIANTS,
                               SEED_BLOCK,
                               STAGE_PARAMS,
                               Config,
                               DataConfig,
                               DCDConfig,
                               DDOConfig,
                               DGConfig,
                               DiscriminatorConfig,
                               ExtractorConfig,
                               GuidanceConfig,
                               ImprovedDGConfig,
                               KernelConfig,
                               LauncherConfig,
                               MetricsConfig,
                               NetworkConfig,
                               PaperConfig,
                               PretrainConfig,
                               Resources,
                               SampleConfig,
                               SamplerConfig,
                               replicate_seed_offset,
                               resources_for,
                               split_guided,
)

__all__ = [
    "ConfigError",
    "Config", "DataConfig", "ExtractorConfig", "NetworkConfig", "PretrainConfig", "SamplerConfig", "DDOConfig",
    "SampleConfig", "MetricsConfig", "PaperConfig", "Resources", "LauncherConfig",
    "GuidanceConfig", "DiscriminatorConfig", "DGConfig", "ImprovedDGConfig", "KernelConfig", "DCDConfig", "GUIDANCE_VARIANTS", "split_guided",
    "STAGE_PARAMS", "SEED_BLOCK", "EXTRA_METRICS", "OMIT_WHEN_EMPTY", "resources_for", "replicate_seed_offset",
    "preset_names", "preset_text", "preset_dict", "apply_overrides", "config_from_dict", "load_config",
    "to_dict", "stage_dict", "config_hash", "dump_yaml",
]
