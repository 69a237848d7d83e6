"""The two places where cast-peft hooks into peft, each checked against peft 0.19-0.21.2 (pinned by
``tests/test_frozen_promise.py::test_peft_shims_are_checked_against_the_installed_peft``).

1. :func:`bind_cast_configs_on_injection`: peft hands a tuner the model only inside ``LoraModel``; binding a
   ``CASTLoraConfig`` to its model (head geometry, skip-set checks) happens in ``_prepare_adapter_config``.
2. :func:`load_cast_configs_from_cast_folders`: every peft and transformers path that opens an adapter folder without
   ``config=`` (``PeftModel.from_pretrained``, ``PeftModel.load_adapter``, transformers' ``model.load_adapter``)
   reads its config through ``PeftConfigMixin.from_pretrained``. For a folder with ``cast_config.json`` beside
   ``adapter_config.json`` that would give a plain ``LoraConfig``: no head masks, and training moves skipped heads.
   The shim returns the ``CASTLoraConfig`` instead. Every other folder loads exactly as before.

This module imports nothing from later stages: the CAST class is passed in.
"""

from __future__ import annotations

import contextvars
import inspect
import os
from typing import Any

from peft import LoraConfig
from peft.config import PeftConfigMixin
from peft.tuners.lora import LoraModel


#: peft versions the shims were read against; a test fails on any other, so an upgrade gets re-checked.
CHECKED_PEFT = ("0.19", "0.20", "0.21")

# Set while CASTLoraConfig.from_pretrained runs: it reads adapter_config.json through LoraConfig.from_pretrained,
# which must then behave as peft's own.
_inside_cast_load: contextvars.ContextVar[bool] = contextvars.ContextVar("cast_peft_inside_cast_load", default=False)


def bind_cast_configs_on_injection(config_cls: type) -> None:
    """Make ``LoraModel`` call ``config.bind(model)`` on every ``config_cls`` before any module is replaced.

    ``_prepare_adapter_config`` is the one step of ``inject_adapter`` that sees both the tuner (and so the model) and
    the adapter config (peft 0.19-0.21.2: a staticmethod on LoraModel).
    """
    prepare = inspect.getattr_static(LoraModel, "_prepare_adapter_config")
    if getattr(prepare, "_cast_peft_wrapped", False):
        return
    original = prepare.__func__ if isinstance(prepare, staticmethod) else None

    def _prepare_adapter_config_binding_cast(self, peft_config, model_config):
        if isinstance(peft_config, config_cls):
            peft_config.bind(self.model)
        if original is not None:
            return original(peft_config, model_config)
        return prepare(self, peft_config, model_config)

    _prepare_adapter_config_binding_cast._cast_peft_wrapped = True
    LoraModel._prepare_adapter_config = _prepare_adapter_config_binding_cast


def load_cast_configs_from_cast_folders(config_cls: type, marker: str) -> None:
    """Make ``PeftConfigMixin.from_pretrained`` return ``config_cls.from_pretrained(...)`` for a local folder holding
    ``marker`` whose ``adapter_config.json`` is a plain LoRA config.

    Only the result type changes, and only for such folders. ``config_cls.from_pretrained`` reads
    ``adapter_config.json`` through ``LoraConfig.from_pretrained``, which must then behave as peft's own, so it is
    wrapped to say so. Hub ids are not probed (that would add a download to every plain LoRA load); for those, pass
    ``config=CASTLoraConfig.from_pretrained(id)``.
    """
    # peft 0.19-0.21.2: a classmethod defined on PeftConfigMixin, inherited by PeftConfig and LoraConfig.
    original = inspect.getattr_static(PeftConfigMixin, "from_pretrained").__func__
    if getattr(original, "_cast_peft_wrapped", False):
        return
    cast_original = inspect.getattr_static(config_cls, "from_pretrained").__func__

    def cast_from_pretrained(cls, *args: Any, **kwargs: Any):
        token = _inside_cast_load.set(True)
        try:
            return cast_original(cls, *args, **kwargs)
        finally:
            _inside_cast_load.reset(token)

    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs: Any):
        config = original(cls, pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        if type(config) is not LoraConfig or _inside_cast_load.get():
            return config
        if not os.path.isfile(os.path.join(str(pretrained_model_name_or_path), subfolder or "", marker)):
            return config
        cast_config = config_cls.from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        # Callers set inference_mode on the returned config themselves; keep the value peft read from the file.
        cast_config.inference_mode = config.inference_mode
        return cast_config

    for wrapper, wrapped in ((cast_from_pretrained, cast_original), (from_pretrained, original)):
        wrapper.__doc__ = wrapped.__doc__
        wrapper._cast_peft_wrapped = True
    config_cls.from_pretrained = classmethod(cast_from_pretrained)
    PeftConfigMixin.from_pretrained = classmethod(from_pretrained)
