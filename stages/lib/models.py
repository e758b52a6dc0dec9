"""The one model check: a model a stage names must be something transformers and vLLM load.

Run in the driver before Ray starts, so a wrong path is one line naming the config field
(`generate.teacher`, `sft.student`, an entry of `evaluate.models`) and exit 2, never a traceback
from an engine actor or a training worker. Hub ids (org/name) are left to the loaders: this
machine may be offline and the id may be in the local cache.
"""
from __future__ import annotations

import glob
import json
import os
import struct

from pipeline.config import is_local_model
from pipeline.errors import UserError


def check_model(model: str, where: str) -> str:
    """`model` unchanged when it loads; UserError naming `where` (e.g. "sft.student") when it
    is empty, or a local folder that is missing, has no config transformers reads, is not a
    causal LM (by model type and saved architectures), holds truncated safetensors, or has no
    weights."""
    if not model:
        role = where.rpartition(".")[2]
        raise UserError(f"no {role}: {where} is empty; set `{role}:` in the recipe or pass "
                        f"{where}=PATH on the command line")
    if not is_local_model(model):
        return model
    path = os.path.expanduser(model)
    if not os.path.isdir(path):
        raise UserError(f"{where} {model}: no such model folder")
    if not os.path.exists(os.path.join(path, "config.json")):
        raise UserError(f"{where} {model}: not a model folder (no config.json in it)")
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{where} {model}: config.json does not load "
                        f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UserError(f"{where} {model}: model type '{config.model_type}' is not a causal "
                        "language model (AutoModelForCausalLM cannot load it)")
    # BERT has a causal-LM head class too, but a checkpoint saved as BertForMaskedLM is an
    # encoder: vLLM and our trainer go by the saved architecture.
    generative = [a for a in config.architectures or []
                  if a.endswith(("ForCausalLM", "LMHeadModel"))]
    if config.architectures and not generative:
        raise UserError(f"{where} {model}: architectures {config.architectures} in config.json: "
                        "not a causal language model (expected e.g. Qwen2ForCausalLM)")
    weights = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    for file in weights:
        _check_safetensors(file, model, where)
    if not weights and not glob.glob(os.path.join(path, "*.bin")):
        raise UserError(f"{where} {model}: no weights in the folder (*.safetensors or *.bin)")
    return model


def _check_safetensors(file: str, model: str, where: str) -> None:
    """A safetensors file is an 8-byte header length, a JSON header, then the tensors: a file
    shorter than the header's last data offset was cut off (an interrupted download or copy)."""
    size = os.path.getsize(file)
    with open(file, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        try:
            header = json.loads(f.read(n)) if 0 < n <= size - 8 else None
        except ValueError:
            header = None
    if header is None:
        raise UserError(f"{where} {model}: {os.path.basename(file)} is not a readable "
                        f"safetensors file ({size} bytes; truncated?)")
    end = 8 + n + max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"),
                      default=0)
    if size < end:
        raise UserError(f"{where} {model}: {os.path.basename(file)} is truncated "
                        f"({size} of {end} bytes)")
