"""Load, merge and validate the three configuration files into one typed object.

`config/config.yaml` says where things live, `params.yaml` how to train (a `base`
section plus one per stage), `schema.yaml` what a dataset must look like. The three are
read once, merged with `key=value` overrides from the command line and checked against
the section dataclasses before any work starts. Every problem is reported with the file,
the dotted key, the value and what is allowed; a typo gets the closest valid key.

The rooms: `sections` (the dataclasses), `checking` (the type checker, generic over
dataclasses), `loading` (the files, overrides and the whole check). The package's names are
the ones the rest of the code imports, from here.
"""

from metal_defect.config.checking import all_keys, parse_section
from metal_defect.config.loading import default_config_dir, dump_yaml, load_config, load_yaml_text
from metal_defect.config.sections import (
    PARAMS_FILE,
    RECIPE_SECTIONS,
    SCHEMA_FILE,
    SECTION_FILES,
    AugmentationParams,
    BaseParams,
    CallbacksParams,
    Config,
    CustomCnnParams,
    DataIngestionParams,
    DataLoaderParams,
    DataPreprocessingParams,
    EarlyStoppingParams,
    EvaluationParams,
    LoggingConfig,
    ModelParams,
    PathsConfig,
    PlateauParams,
    RangeParam,
    Recipe,
    ReviewConfig,
    SchemaConfig,
    SearchSpaceParams,
    SplitParams,
    TrainParams,
    TransferParams,
    TuningParams,
    fingerprint_of,
    to_plain,
)

__all__ = [
    "PARAMS_FILE", "RECIPE_SECTIONS", "SCHEMA_FILE", "SECTION_FILES", "AugmentationParams", "BaseParams", "CallbacksParams", "Config",
    "CustomCnnParams", "DataIngestionParams", "DataLoaderParams", "DataPreprocessingParams", "EarlyStoppingParams", "EvaluationParams",
    "LoggingConfig", "ModelParams", "PathsConfig", "PlateauParams", "RangeParam", "Recipe", "ReviewConfig", "SchemaConfig", "SearchSpaceParams",
    "SplitParams", "TrainParams", "TransferParams", "TuningParams", "all_keys", "default_config_dir", "dump_yaml", "fingerprint_of",
    "load_config", "load_yaml_text", "parse_section", "to_plain",
]
