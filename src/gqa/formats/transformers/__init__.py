"""A transformers folder: ``config.json`` (:mod:`.config`), safetensors shards (:mod:`.safetensors`: the
streaming header/tensor reader and :class:`~.safetensors.SafetensorsWriter`) and the folder itself with its
side files (:mod:`.folder`: :func:`load_hf`, :func:`save_hf`, ...). One concept per file."""

from gqa.formats.transformers.config import config_from_hf, config_to_hf, model_type_for, spec_from_config
from gqa.formats.transformers.folder import (
    SIDE_FILES,
    check_weight_table,
    copy_side_files,
    from_transformers,
    load_hf,
    load_weights,
    save_hf,
    weight_map,
    write_model_folder,
)
from gqa.formats.transformers.safetensors import SafetensorsWriter, TensorInfo, read_folder, read_header, read_tensor

__all__ = [
    "spec_from_config",
    "config_from_hf",
    "config_to_hf",
    "model_type_for",
    "SIDE_FILES",
    "check_weight_table",
    "copy_side_files",
    "from_transformers",
    "load_hf",
    "load_weights",
    "save_hf",
    "weight_map",
    "write_model_folder",
    "SafetensorsWriter",
    "TensorInfo",
    "read_folder",
    "read_header",
    "read_tensor",
]
