from repro.config.schema import *  # noqa: F401,F403
from repro.config.schema import (_coerce, _cross_checks, _deep_merge)  # noqa: F401
