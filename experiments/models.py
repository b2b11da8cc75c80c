"""Model specs for the CLI: a built-in tiny model, a sandbox model, or a local transformers folder.

``load_model(spec)`` returns a :class:`LoadedModel` (model in eval mode, its adapter, a
tokenizer when one is known). Nothing is downloaded: a folder must hold the weights, and a
name that is neither a built-in nor an existing folder is an error listing the choices.

A model larger than one device loads from its folder with ``device_map`` (and usually ``dtype``),
passed to transformers' ``from_pretrained``: ``load_model("/data/Emu3-Gen", device_map="auto",
dtype="bfloat16")`` spreads the blocks over the GPUs, then CPU RAM, then disk (``offload_folder``).
transformers places the weights through ``accelerate``, so any ``device_map`` needs it installed.
Inputs are prepared on CPU: accelerate's hooks move them to the first block's device and bring
outputs back, so capture and patching run unchanged (captured rows land on ``device="cpu"``).
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from uniprobe.experiments.tiny import TINY_BUILDERS, build_tiny
from uniprobe.hooks.adapters import ADAPTERS, Adapter, ModelInputs, adapter_for, load_adapter_file
from uniprobe.hooks.capture import Captured
from uniprobe.hooks.errors import MissingDependencyError


@dataclass
class LoadedModel:
    """A model ready for capture: the module, its adapter, a tokenizer (or None), extra info.

    The front door's handle (``uniprobe.load_model``): it prepares inputs, captures, maps words to
    token ids, so a session needs no adapter calls of its own::

        loaded = up.load_model("sandbox-ar")
        out, cache = loaded.run_with_cache("what is 2 + 1 ?", "blocks.*.resid_post")
        cache["blocks.3.resid_post"]          # [batch, pos, d_model]
        loaded.token_str(int(up.logits_of(out)[0, -1].argmax()))
    """

    model: nn.Module
    adapter: Adapter
    tokenizer: Any = None
    info: dict[str, Any] = field(default_factory=dict)
    spec: str = ""

    # -- examples and inputs ----------------------------------------------------------------------
    def examples(self, items: str | dict | Sequence[str | dict]) -> list[dict[str, Any]]:
        """Example dicts from prompts: a text becomes ``{"prompt": text}`` (sandbox models, which
        build their own batches) or ``{"input_ids": ...}``; dicts pass through unchanged."""
        items = [items] if isinstance(items, (str, dict)) else list(items)
        out = []
        for item in items:
            if isinstance(item, dict):
                out.append(dict(item))
            elif self.info.get("text_prompts"):
                out.append({"prompt": item})
            else:
                out.append({"input_ids": self.encode(item)})
        return out

    def prepare(self, items: str | dict | Sequence[str | dict], mode: str = "understanding") -> ModelInputs:
        """The adapter's model inputs for ``items`` (texts or example dicts): kwargs plus the
        :class:`~uniprobe.hooks.layout.TokenLayout` ``[batch, pos]`` of roles."""
        return self.adapter.prepare(self.model, self.examples(items), mode=mode)

    def run_with_cache(
        self,
        items: str | dict | Sequence[str | dict] | ModelInputs,
        points: str | Sequence[str] = "blocks.*.resid_post",
        *,
        roles: Sequence[str] | None = None,
        mode: str = "understanding",
        backend: str = "torch",
        dtype: torch.dtype | None = None,
        generate_kwargs: dict[str, Any] | None = None,
    ) -> tuple[Any, Captured]:
        """Run once with ``points`` hooked: ``(outputs, cache)``, like TransformerLens's ``run_with_cache``.

        ``cache[point]`` is ``[batch, pos, *feature]`` when every position was kept, else read
        ``cache.rows(point)`` (values ``[n, *feature]`` with example / pos / role / step / branch).
        ``mode="generate"`` runs the adapter's image generation with every step captured; ``outputs``
        is then the generated tokens ``[batch, n]`` (a diffusion decoder's: latents ``[batch, *latent]``),
        ``generate_kwargs`` the generation's settings (``num_inference_steps``, ``guidance_scale``, ``seed``).
        """
        from uniprobe.hooks.backends import run_capture

        generate = mode == "generate"
        inputs = (
            items
            if isinstance(items, ModelInputs)
            else self.prepare(items, "generation" if generate else mode)
        )
        if generate:
            cap = run_capture(
                self.model, inputs, points, adapter=self.adapter, roles=roles, dtype=dtype, generate=True,
                generate_kwargs=generate_kwargs,
            )  # fmt: skip
            return cap.generated, cap
        if backend != "torch":
            cap = run_capture(
                self.model, inputs, points, adapter=self.adapter, backend=backend, roles=roles, dtype=dtype
            )
            with torch.no_grad():
                return self.adapter.run(self.model, inputs), cap
        from uniprobe.hooks.capture import capture

        with (
            torch.no_grad(),
            capture(
                self.model, points, adapter=self.adapter, layout=inputs.layout, roles=roles, dtype=dtype
            ) as cap,
        ):
            outputs = self.adapter.run(self.model, inputs)
        return outputs, cap

    def capture_dataset(
        self, items: Sequence[str | dict], points: str | Sequence[str], out: str | Path, **kwargs: Any
    ) -> Any:
        """:func:`uniprobe.hooks.pipeline.capture_dataset` of ``items`` (texts or example dicts) into a
        store at ``out``; returns the store opened for reading."""
        from uniprobe.hooks.pipeline import capture_dataset

        kwargs.setdefault("model_info", {"spec": self.spec})
        return capture_dataset(self.model, self.examples(items), points, out, adapter=self.adapter, **kwargs)

    # -- tokens and points ------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """A prompt's token ids (with the special tokens the tokenizer adds to prompts)."""
        from uniprobe.experiments.tokens import encode

        return encode(self, text)

    def token_id(self, word: str) -> int:
        """The single token id of ``word`` (an error when it is not exactly one token)."""
        from uniprobe.experiments.tokens import token_id

        return token_id(self, word)

    def token_str(self, tid: int) -> str:
        """The readable form of token id ``tid``."""
        from uniprobe.experiments.tokens import token_str

        return token_str(self, tid)

    def points(self) -> list[str]:
        """Every hook point of this model (``blocks.{i}.resid_post``, ``final_norm``, ...)."""
        return list(self.adapter.points(self.model))


def sandbox_names() -> list[str]:
    """Names of the shipped sandbox models (empty until the sandbox is installed)."""
    try:
        from uniprobe.experiments.sandbox.registry import SANDBOX_MODELS
    except ImportError:
        return []
    return list(SANDBOX_MODELS)


def builtin_names() -> list[str]:
    return list(TINY_BUILDERS) + sandbox_names()


def load_model(
    spec: str,
    adapter_file: str | None = None,
    *,
    device_map: str | dict[str, Any] | None = None,
    dtype: str | torch.dtype | None = None,
    torch_dtype: str | torch.dtype | None = None,
    **from_pretrained: Any,
) -> LoadedModel:
    """Resolve ``spec``: a built-in tiny config, a sandbox name, or a local folder.

    Args:
        spec: a name of :func:`builtin_names` or a local transformers model folder.
        adapter_file: an adapter spec (JSON/YAML) for a checkpoint no built-in adapter serves.
        device_map: for a transformers folder, passed to ``from_pretrained``: ``"auto"`` (fill the
            GPUs, then CPU RAM, then disk), ``"balanced"``, ``"sequential"``, a device (``"cpu"``,
            ``"cuda:0"``) or a dict ``{module path: device}``. Needs ``accelerate``.
        dtype: weights' dtype for a transformers folder (``torch.bfloat16``, ``"bfloat16"``,
            ``"auto"`` = as saved); ``torch_dtype`` is its older transformers name.
        from_pretrained: further ``from_pretrained`` keywords for a folder (``max_memory``,
            ``offload_folder``, ``attn_implementation``, ...).

    Built-in tiny and sandbox models are small and load on CPU in float32: ``device_map``, ``dtype``
    and loading keywords are an error for them.
    """
    if torch_dtype is not None:
        if dtype is not None:
            raise ValueError("give dtype or torch_dtype (its older name), not both")
        dtype = torch_dtype
    load_options = dict(from_pretrained)
    if device_map is not None:
        load_options["device_map"] = device_map
    if dtype is not None:
        load_options["dtype"] = dtype
    if spec in TINY_BUILDERS or spec in sandbox_names():
        _no_load_options(spec, "a built-in model", load_options)
    if spec in TINY_BUILDERS:
        model, info = build_tiny(spec)
        return LoadedModel(model, adapter_for(model), _tiny_tokenizer(info), info, spec)
    if spec in sandbox_names():
        from uniprobe.experiments.sandbox.registry import SANDBOX_MODELS, sandbox_parts

        return LoadedModel(*sandbox_parts(SANDBOX_MODELS[spec]), spec)
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(
            f"model {spec!r} is neither a built-in ({', '.join(builtin_names())}) nor an existing folder. "
            "Pass a local transformers model folder (config.json + weights); nothing is downloaded."
        )
    return _load_folder(path, adapter_file, load_options)


def _no_load_options(spec: str, what: str, options: dict[str, Any]) -> None:
    if options:
        raise ValueError(
            f"{', '.join(sorted(options))} apply to transformers model folders; {spec!r} is {what}, "
            "small enough to load on CPU in float32 (drop the option, or pass a folder)"
        )


def has_accelerate() -> bool:
    """Whether ``accelerate`` is importable (transformers needs it for any ``device_map``)."""
    return importlib.util.find_spec("accelerate") is not None


def _check_device_map(device_map: Any) -> None:
    if device_map is not None and not has_accelerate():
        raise MissingDependencyError(
            f"device_map={device_map!r} needs the accelerate package (transformers places the weights "
            "through it): pip install accelerate — or load without device_map (the model then goes to "
            "CPU RAM in one piece)"
        )


def _load_folder(
    path: Path, adapter_file: str | None, load_options: dict[str, Any] | None = None
) -> LoadedModel:
    load_options = dict(load_options or {})
    if (path / "config.json").exists() and json.loads((path / "config.json").read_text()).get("arch") in (
        "ar",
        "query",
        "mot",
    ):
        from uniprobe.experiments.sandbox.registry import sandbox_parts

        _no_load_options(str(path), "a sandbox checkpoint", load_options)
        return LoadedModel(*sandbox_parts(path), str(path))
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} has no config.json: not a transformers model folder")
    _check_device_map(load_options.get("device_map"))
    import transformers
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    archs = getattr(config, "architectures", None) or []
    cls = next((getattr(transformers, a) for a in archs if hasattr(transformers, a)), None)
    if cls is None:
        raise ValueError(
            f"{path}/config.json names architectures {archs or 'none'}, none of them a transformers class. "
            f"Supported families: {', '.join(ADAPTERS)}"
        )
    model = cls.from_pretrained(path, **load_options).eval()
    if load_options.get("device_map") is not None:
        _move_inputs_to_model(model)
    adapter = load_adapter_file(adapter_file) if adapter_file else adapter_for(model)
    info: dict[str, Any] = {}
    if load_options.get("device_map") is not None:
        info["device_map"] = load_options["device_map"]
    if load_options.get("dtype") is not None:
        info["dtype"] = str(load_options["dtype"])
    if getattr(model, "hf_device_map", None):
        info["hf_device_map"] = dict(model.hf_device_map)
    return LoadedModel(model, adapter, _folder_tokenizer(path), info, str(path))


def model_devices(model: nn.Module) -> set[torch.device]:
    """The devices holding ``model``'s parameters (``meta`` for weights offloaded by accelerate)."""
    return {p.device for p in model.parameters()}


def _move_inputs_to_model(model: nn.Module) -> None:
    """Let CPU-prepared inputs reach a model placed whole on one accelerator.

    transformers attaches accelerate's device hooks only when a ``device_map`` spans several
    devices (or disk); a model mapped whole onto one GPU gets none, and the adapters prepare
    inputs on CPU. One ``AlignDevicesHook`` on the top module moves the inputs there and the
    outputs back, as a multi-device dispatch does.
    """
    if getattr(model, "_hf_hook", None) is not None:
        return
    devices = model_devices(model)
    if len(devices) != 1 or next(iter(devices)).type in ("cpu", "meta"):
        return
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    add_hook_to_module(model, AlignDevicesHook(execution_device=next(iter(devices)), io_same_device=True))


def _folder_tokenizer(path: Path) -> Any:
    """The tokenizer saved in a model folder, or None.

    A generic ``PreTrainedTokenizerFast`` (e.g. a word-level one built in code) is loaded as
    itself: ``AutoTokenizer`` would pick the model family's class from config.json and re-split it.
    """
    if not any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    cfg_file = path / "tokenizer_config.json"
    declared = json.loads(cfg_file.read_text()).get("tokenizer_class") if cfg_file.exists() else None
    if declared in ("PreTrainedTokenizerFast", "TokenizersBackend") or (
        declared is None and (path / "tokenizer.json").exists()
    ):
        return PreTrainedTokenizerFast.from_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


class TinyTokenizer:
    """The tiny models' tokenizer: ``"t5 t6"`` ↔ ``[5, 6]`` (a word is ``t`` + its id)."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        ids = []
        for word in text.split():
            if not (word.startswith("t") and word[1:].isdigit() and int(word[1:]) < self.vocab_size):
                raise ValueError(f"tiny tokenizer: {word!r} is not a token t0..t{self.vocab_size - 1}")
            ids.append(int(word[1:]))
        return ids

    def decode(self, ids: list[int]) -> str:
        return " ".join(f"t{i}" for i in ids)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [f"t{i}" for i in ids]


def _tiny_tokenizer(info: dict[str, Any]) -> TinyTokenizer:
    return TinyTokenizer(int(info.get("vocab_size", 64)))


@dataclass(frozen=True)
class TokenLimits:
    """What token ids a model takes: ids ``0 .. vocab_size - 1``, at most ``max_positions`` of them.

    ``None`` where the model does not say (a custom module without a transformers config)."""

    vocab_size: int | None
    max_positions: int | None


# names transformers configs give the longest sequence the position embeddings cover
_POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length")


def token_limits(loaded: LoadedModel) -> TokenLimits:
    """The vocabulary size and position limit of ``loaded``'s text backbone.

    The vocabulary is the input embedding's row count (an id past it cannot be embedded, whatever
    the config says); the position limit is the backbone config's ``max_position_embeddings``.
    Wrappers that have neither (sandbox and query models) are searched for the first sub-module
    that has them (their ``lm``).
    """
    vocab = positions = None
    for module in loaded.model.modules():
        if vocab is None:
            vocab = _embedding_rows(module)
        if positions is None:
            positions = _max_positions(getattr(module, "config", None))
        if vocab is not None and positions is not None:
            break
    if vocab is None and isinstance(loaded.info.get("vocab_size"), int):
        vocab = loaded.info["vocab_size"]
    return TokenLimits(vocab, positions)


def _embedding_rows(module: nn.Module) -> int | None:
    get = getattr(module, "get_input_embeddings", None)
    if not callable(get):
        return None
    try:
        emb = get()
    except (NotImplementedError, AttributeError):  # a PreTrainedModel that does not define it
        return None
    return emb.num_embeddings if isinstance(emb, nn.Embedding) else None


def _max_positions(config: Any) -> int | None:
    if config is None or isinstance(config, dict):
        return None
    text = config.get_text_config() if callable(getattr(config, "get_text_config", None)) else config
    for cfg in (text, config):
        for key in _POSITION_KEYS:
            value = getattr(cfg, key, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def encode(loaded: LoadedModel, text: str) -> list[int]:
    """Token ids of ``text`` with the model's tokenizer (error when the model has none)."""
    return loaded.encode(text)
