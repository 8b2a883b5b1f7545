"""Converting NVIDIA's StyleGAN2 TensorFlow pickle: round trip, TF semantics, safety."""
import codecs
import os
import pickle

import numpy as np
import pytest
import torch

import tf_reference as tf
from helpers import PlantsAMarker
from models.checkpoints import CheckpointError
from models.loaders import load_generator
from models.nvidia_pickle import CONVERTER_VERSION, PickleError, convert_pickle
from models.spec import WeightRef
from models.stylegan2 import Generator
from models.tiny import tiny_channels
from nvidia_pickles import official_networks, pickle_bytes, plain_load, random_generator_state


def small_generator(size, style_dim, n_mlp, channels):
    g = Generator(size, style_dim=style_dim, n_mlp=n_mlp, channels=channels)
    return g, random_generator_state(g, seed=size)


@pytest.fixture(scope="module")
def g64():
    """The round-trip subject: 64 px in our layout, every value random."""
    return small_generator(64, 64, 8, tiny_channels(64))


def write(path, networks, protocol=3):
    path.write_bytes(pickle_bytes(networks, protocol=protocol))
    return path


@pytest.mark.parametrize("protocol", [2, 3, 4])
def test_round_trip_gives_back_every_key_and_value(tmp_path, g64, protocol):
    g, sd = g64
    latent_avg = torch.randn(64)
    src = write(tmp_path / "net.pkl", official_networks(sd, latent_avg), protocol)
    if protocol <= 3:
        assert b"numpy.core.multiarray" in src.read_bytes()     # as NVIDIA's numpy-1.x files
    result = convert_pickle(str(src), tmp_path / "g.pt")

    ckpt = torch.load(tmp_path / "g.pt", map_location="cpu", weights_only=True)
    assert list(ckpt["g_ema"]) == list(sd)                       # same keys, same order
    for key, value in sd.items():
        assert torch.equal(ckpt["g_ema"][key], value), key
    assert torch.equal(ckpt["latent_avg"], latent_avg)
    meta = ckpt["converted_from"]
    assert meta["converter"] == CONVERTER_VERSION and meta["file"] == "net.pkl"
    assert meta["sha256"] == result.source_sha256 and len(result.source_sha256) == 64
    assert result.config["size"] == 64 and result.config["n_mlp"] == 8


def test_converted_generator_draws_the_same_images(tmp_path, g64):
    g, sd = g64
    src = write(tmp_path / "net.pkl", official_networks(sd, torch.zeros(64)))
    convert_pickle(str(src), tmp_path / "g.pt")
    converted = load_generator(WeightRef(str(tmp_path / "g.pt"))).module
    g.load_state_dict(sd)
    latent = torch.randn(2, g.n_latent, 64, generator=torch.Generator().manual_seed(1))
    noise = g.make_noise(2, "randn", torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(converted(latent, noise), g(latent, noise))


@pytest.fixture(scope="module")
def tf_file(tmp_path_factory):
    """A 32 px pickle of random TF-layout arrays with a non-default mapping lr multiplier,
    its raw variables read back with plain pickle, and the converted generator."""
    tmp = tmp_path_factory.mktemp("tf")
    _, sd = small_generator(32, 16, 3, {4: 8, 8: 8, 16: 6, 32: 4})
    data = pickle_bytes(official_networks(sd, torch.randn(16), mapping_kwargs={"mapping_lrmul": 0.1}))
    (tmp / "net.pkl").write_bytes(data)
    _, _, gs = plain_load(data)
    comps = gs.state["components"]
    raw = {"synthesis": comps["synthesis"].vars(), "mapping": comps["mapping"].vars(),
           "own": gs.vars()}
    convert_pickle(str(tmp / "net.pkl"), tmp / "g.pt")
    loaded = load_generator(WeightRef(str(tmp / "g.pt")))
    return raw, loaded.module.double(), loaded.extra["latent_avg"]


def close(ours: torch.Tensor, reference: np.ndarray):
    """Equal up to float32 rounding of the stored weights (the maths runs in float64)."""
    ours = ours.detach().numpy()
    assert ours.shape == reference.shape
    scale = np.abs(reference).max()
    assert scale > 0 and np.abs(ours - reference).max() <= 1e-6 * scale, \
        np.abs(ours - reference).max() / scale


def draw(seed, *shapes):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape) for shape in shapes]


def test_mapping_dense_layer_with_its_lr_multiplier(tf_file):
    raw, g, _ = tf_file
    m = raw["mapping"]
    x, = draw(0, (3, 16))
    close(g.style[1](torch.from_numpy(x)), tf.dense(x, m["Dense0/weight"], m["Dense0/bias"], 0.1))
    close(g.mapping(torch.from_numpy(x)), tf.mapping(x, m, 0.1, 3))


def test_modulated_conv_with_mod_bias_plus_one_and_noise_strength(tf_file):
    raw, g, _ = tf_file
    s = raw["synthesis"]
    x, w, noise = draw(1, (2, 8, 4, 4), (2, 16), (2, 1, 4, 4))
    assert g.conv1.noise.weight.shape == (1,)
    assert g.conv1.noise.weight.item() == pytest.approx(float(s["4x4/Conv/noise_strength"]))
    ours = g.conv1(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(noise))
    close(ours, tf.modulated_layer(x, w, s, "4x4/Conv", noise))


def test_upsampling_conv_kernel_flip_and_transpose(tf_file):
    raw, g, _ = tf_file
    s = raw["synthesis"]
    x, w, noise = draw(2, (2, 8, 8, 8), (2, 16), (2, 1, 16, 16))
    reference = tf.modulated_layer(x, w, s, "16x16/Conv0_up", noise, up=True)
    ours = g.convs[2](torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(noise))
    close(ours, reference)
    # the check can fail: the same layer with the file's kernel left unflipped differs
    converted = g.convs[2].conv.weight.detach().clone()
    with torch.no_grad():
        g.convs[2].conv.weight.copy_(converted.flip(-1, -2))
        wrong = g.convs[2](torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(noise))
        g.convs[2].conv.weight.copy_(converted)
    assert not np.allclose(wrong.numpy(), reference)


def test_to_rgb_with_its_upsampled_skip(tf_file):
    raw, g, _ = tf_file
    s = raw["synthesis"]
    x, w, skip = draw(3, (2, 8, 8, 8), (2, 16), (2, 3, 4, 4))
    ours = g.to_rgbs[0](torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(skip))
    close(ours, tf.torgb(x, w, s, "8x8/ToRGB", skip))


def test_whole_synthesis_const_noise_maps_and_mean_latent(tf_file):
    raw, g, _ = tf_file
    s = raw["synthesis"]
    dlatents, = draw(4, (2, g.n_latent, 16))
    noises = [s[f"noise{i}"] for i in range(g.num_layers)]
    ours = g(torch.from_numpy(dlatents), [torch.from_numpy(n).double() for n in noises])
    close(ours * 2 - 1, tf.synthesis(dlatents, s, noises))
    assert torch.equal(g.input.input, torch.from_numpy(s["4x4/Const/const"]).double())


def test_dlatent_avg_becomes_latent_avg(tf_file):
    raw, _, latent_avg = tf_file
    assert torch.equal(latent_avg, torch.from_numpy(raw["own"]["dlatent_avg"]))


# --- safety and clear errors --------------------------------------------------------


@pytest.mark.parametrize("via", ["system", "eval"])
@pytest.mark.parametrize("where", ["top", "inside a variable"])
def test_a_pickle_that_calls_a_global_is_refused_and_nothing_runs(tmp_path, g64, via, where):
    marker = tmp_path / "marker"
    attack = PlantsAMarker(marker, via=via)
    if where == "top":
        obj = attack
    else:
        _, sd = g64
        G, D, Gs = official_networks(sd, torch.zeros(64))
        Gs.state["components"]["synthesis"].state["variables"].insert(0, ("noise0", attack))
        obj = (G, D, Gs)
    src = tmp_path / "evil.pkl"
    src.write_bytes(pickle_bytes(obj))
    with pytest.raises(PickleError, match=r"refused: .*(system|eval).*nothing in the file was run"):
        convert_pickle(str(src), tmp_path / "g.pt")
    assert not marker.exists()
    assert not (tmp_path / "g.pt").exists()
    # the same file does run code under a plain unpickler: the test can fail
    plain_load(src.read_bytes())
    assert marker.exists()


def test_an_array_of_python_objects_is_refused(tmp_path, g64):
    _, sd = g64
    G, D, Gs = official_networks(sd, torch.zeros(64))
    Gs.state["variables"].append(("extra", np.array([1, "x"], dtype=object)))
    src = tmp_path / "obj.pkl"
    src.write_bytes(pickle_bytes((G, D, Gs)))
    with pytest.raises(PickleError, match="non-numeric dtype 'O"):
        convert_pickle(str(src), tmp_path / "g.pt")


class Reduces:
    """An object that pickles as `callable(*args)` with an optional BUILD state."""

    def __init__(self, *reduce_value):
        self.reduce_value = reduce_value

    def __reduce__(self):
        return self.reduce_value


RECONSTRUCT = np.ndarray.__reduce__(np.zeros(1))[0]
HOSTILE = {
    # numpy's dtype state carries internal flags: 0x02 made numpy read past a list
    # (segfault), 0x04 returned a process address instead of the file's bytes
    "dtype flags": (Reduces(np.dtype, ("f8", False, True), (3, "<", None, None, None, -1, -1, 2)),
                    "dtype with unexpected state"),
    # a zero-stride view: 4 bytes in the file, 4 TiB once copied
    "ndarray called": (Reduces(np.ndarray, ((1 << 40,), np.dtype("f4"), b"\0" * 4, 0, (0,))),
                       "calls numpy.ndarray directly"),
    "short array data": (Reduces(RECONSTRUCT, (np.ndarray, (0,), b"b"),
                                 (1, (10 ** 6,), np.dtype("f4"), False, b"\0" * 4)),
                         "whose data has 4 bytes"),
    # nested codecs grow a small file into a huge object
    "other codec": (Reduces(codecs.encode, ("abc", "rot13")), "_codecs.encode with str, 'rot13'"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_uses_of_the_allowed_globals_are_refused(tmp_path, case):
    obj, message = HOSTILE[case]
    (tmp_path / "x.pkl").write_bytes(pickle_bytes(obj, protocol=4))
    with pytest.raises(PickleError, match=message):
        convert_pickle(str(tmp_path / "x.pkl"), tmp_path / "g.pt")


def test_a_file_cannot_set_state_on_an_allowed_global(tmp_path):
    # GLOBAL numpy.dtype, an empty dict + one item, BUILD: would set an attribute on the class
    (tmp_path / "x.pkl").write_bytes(b"\x80\x02cnumpy\ndtype\n}X\x01\x00\x00\x00aK\x01sb.")
    with pytest.raises(PickleError, match="sets the state of a type"):
        convert_pickle(str(tmp_path / "x.pkl"), tmp_path / "g.pt")


def test_truncated_and_foreign_files_give_clear_errors(tmp_path, g64):
    _, sd = g64
    data = pickle_bytes(official_networks(sd, torch.zeros(64)))
    cases = {
        "truncated.pkl": (data[: len(data) // 2], "not a readable pickle.*truncated"),
        "empty.pkl": (b"", "not a readable pickle"),
        "dict.pkl": (pickle.dumps({"g_ema": 1}), "holds a dict, expected the tuple"),
        "noise.pkl": (os.urandom(1000), "not a readable pickle|refused"),
    }
    torch.save({"g_ema": {}}, tmp_path / "torch.pt")
    cases["torch.pt"] = ((tmp_path / "torch.pt").read_bytes(), "ZIP archive: a PyTorch checkpoint")
    for name, (body, message) in cases.items():
        (tmp_path / name).write_bytes(body)
        with pytest.raises(CheckpointError, match=message):
            convert_pickle(str(tmp_path / name), tmp_path / "out.pt")
        assert not (tmp_path / "out.pt").exists(), name


def test_a_stylegan1_or_incomplete_network_is_named(tmp_path, g64):
    _, sd = g64
    G, D, Gs = official_networks(sd, torch.zeros(64))
    Gs.state["components"]["synthesis"].state["build_func_name"] = "G_synthesis"
    (tmp_path / "v1.pkl").write_bytes(pickle_bytes((G, D, Gs)))
    with pytest.raises(PickleError, match="'G_synthesis', not 'G_synthesis_stylegan2'"):
        convert_pickle(str(tmp_path / "v1.pkl"), tmp_path / "g.pt")

    G, D, Gs = official_networks(sd, torch.zeros(64))
    variables = Gs.state["components"]["synthesis"].state["variables"]
    variables[:] = [(n, v) for n, v in variables if n != "16x16/Conv1/mod_bias"]
    (tmp_path / "cut.pkl").write_bytes(pickle_bytes((G, D, Gs)))
    with pytest.raises(PickleError, match="no variable '16x16/Conv1/mod_bias'"):
        convert_pickle(str(tmp_path / "cut.pkl"), tmp_path / "g.pt")

    G, D, Gs = official_networks(sd, torch.zeros(64))
    Gs.state["components"]["synthesis"].state["variables"].append(("8x8/Skip/weight", np.ones(3)))
    (tmp_path / "extra.pkl").write_bytes(pickle_bytes((G, D, Gs)))
    with pytest.raises(PickleError, match="unexpected variables .*8x8/Skip/weight"):
        convert_pickle(str(tmp_path / "extra.pkl"), tmp_path / "g.pt")
