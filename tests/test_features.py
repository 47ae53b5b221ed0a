"""Feature extraction and the feature cache: one pass equals nine, the pass stops early, pooling,
noise, and a cache whose hits are exactly its misses (atomic writes, full keys, LRU eviction)."""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import UNet2DModel
from torch.utils.data import Dataset, Subset

from ddsweep import data, diffusion, features, probes
from ddsweep.config.model import BLOCKS, PIXELS, ModelConfig
from ddsweep.config.probe import validate_pool
from ddsweep.errors import UserError
from ddsweep.features import (
    CacheKey,
    FeatureCache,
    FeatureRequest,
    block_dims,
    cached_features,
    check_memory,
    extract,
    noise_for,
)
from ddsweep.model import build_unet, resolve_block

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RES = 16
N = 48  # images in most tests: three batches of 16
BATCH = 16
ALL = (*BLOCKS, PIXELS)
Item = tuple[torch.Tensor, int]


@pytest.fixture(scope="module")
def unet() -> UNet2DModel:
    """A random 4-level, 32-wide U-Net at 16 px (attention in level 2 and the mid block)."""
    torch.manual_seed(0)
    return build_unet(ModelConfig(resolution=RES, channels=(32, 32, 32, 32))).eval()


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("data")  # digits ship with scikit-learn: nothing is read


@pytest.fixture(scope="module")
def images(digits_dir: Path) -> Dataset[Item]:
    """The first 48 digits test images at 16 px."""
    return Subset(data.labelled_split("digits", "test", RES, digits_dir), range(N))


def stacked(ds: Dataset[Item]) -> torch.Tensor:
    return torch.stack([ds[i][0] for i in range(len(ds))])  # type: ignore[arg-type]


@dataclasses.dataclass
class Calls:
    """Forward calls per module path, and the inputs of the first ones."""

    count: dict[str, int]
    inputs: dict[str, list[tuple[Any, ...]]]


@pytest.fixture
def calls(unet: UNet2DModel) -> Iterator[Calls]:
    """Count forward calls of every block, the head and the whole net; record inputs."""
    paths = {
        **{b: resolve_block(unet, b) for b in BLOCKS},
        "conv_in": unet.conv_in,
        "conv_out": unet.conv_out,
        "unet": unet,
    }
    rec = Calls({p: 0 for p in paths}, {p: [] for p in paths})

    def pre(path: str) -> Any:
        def fn(_m: torch.nn.Module, args: tuple[Any, ...]) -> None:
            rec.count[path] += 1
            rec.inputs[path].append(args)

        return fn

    handles = [m.register_forward_pre_hook(pre(p)) for p, m in paths.items()]
    yield rec
    for h in handles:
        h.remove()


# --- one pass fills every block ------------------------------------------------------------


@pytest.mark.parametrize(("noise_step", "pool"), [(0, "avg"), (50, "flatten"), (300, "avg2")])
def test_one_pass_equals_nine_single_block_passes(
    unet: UNet2DModel, images: Dataset[Item], noise_step: int, pool: str
) -> None:
    together, labels = extract(
        unet, images, FeatureRequest(ALL, noise_step, 7, pool), batch_size=BATCH
    )
    assert set(together) == set(ALL)
    for block in ALL:
        alone, alone_labels = extract(
            unet, images, FeatureRequest((block,), noise_step, 7, pool), batch_size=BATCH
        )
        assert list(alone) == [block]
        assert torch.equal(alone[block], together[block]), block
        assert torch.equal(alone_labels, labels)
    assert torch.equal(labels, torch.tensor([images[i][1] for i in range(N)]))


def test_noise_is_drawn_per_image_so_batch_size_does_not_matter(
    unet: UNet2DModel, images: Dataset[Item]
) -> None:
    shape = (3, RES, RES)
    whole = noise_for(torch.arange(10), shape, noise_seed=3, split="")
    assert torch.equal(noise_for(torch.tensor([7, 2]), shape, 3, split=""), whole[[7, 2]])
    assert not torch.equal(noise_for(torch.arange(10), shape, 4, split=""), whole)
    assert not torch.equal(whole[0], whole[1])

    req = FeatureRequest(ALL, 200, 3, "flatten")
    a, _ = extract(unet, images, req, batch_size=BATCH)
    b, _ = extract(unet, images, req, batch_size=7)  # 7 batches, the last of 6 images
    # The noised input itself is bit-identical whatever the batching...
    assert torch.equal(a[PIXELS], b[PIXELS])
    # ...and so are the features up to the last bits: torch's CPU convolutions pick their
    # kernels by batch size (measured: the up blocks' upsampler conv), but noise drawn per
    # batch would change every value by O(1).
    for block in BLOCKS:
        torch.testing.assert_close(a[block], b[block], rtol=1e-5, atol=1e-5, msg=block)
    other, _ = extract(unet, images, dataclasses.replace(req, noise_seed=4), batch_size=BATCH)
    assert (other[PIXELS] - a[PIXELS]).abs().max() > 0.1


# --- the pass stops early -----------------------------------------------------------------


def test_a_request_for_down1_never_runs_the_decoder(
    unet: UNet2DModel, images: Dataset[Item], calls: Calls
) -> None:
    extract(unet, images, FeatureRequest(("down1",)), batch_size=BATCH)
    batches = N // BATCH
    assert calls.count["unet"] == batches
    assert calls.count["down1"] == batches
    assert calls.count["down2"] == 0
    assert calls.count["mid"] == 0
    assert calls.count["up4"] == 0  # up_blocks.0
    assert calls.count["conv_out"] == 0


def test_a_request_for_up1_runs_every_block(
    unet: UNet2DModel, images: Dataset[Item], calls: Calls
) -> None:
    extract(unet, images, FeatureRequest(("up1",)), batch_size=BATCH)
    assert {b: calls.count[b] for b in BLOCKS} == {b: N // BATCH for b in BLOCKS}
    assert calls.count["conv_out"] == 0  # the output head after up1 is skipped


def test_pixels_alone_never_run_the_network(
    unet: UNet2DModel, images: Dataset[Item], calls: Calls
) -> None:
    extract(unet, images, FeatureRequest((PIXELS,)), batch_size=BATCH)
    assert calls.count["unet"] == 0


def test_hooks_are_removed_after_every_pass(unet: UNet2DModel, images: Dataset[Item]) -> None:
    def hooks() -> int:
        return sum(len(m._forward_hooks) for m in unet.modules())

    before = hooks()
    extract(unet, images, FeatureRequest(("down2", "up3")), batch_size=BATCH)
    assert hooks() == before
    # A bad name among good ones: refused before any hook is registered.
    with pytest.raises(UserError):
        block_dims(unet, FeatureRequest(("down1", "bogus")), (3, RES, RES))
    assert hooks() == before


# --- pooling and block names --------------------------------------------------------------


def raw_outputs(unet: UNet2DModel, x: torch.Tensor, paths: list[str]) -> dict[str, torch.Tensor]:
    """The unpooled output of each path in one full forward pass at t=0."""
    out: dict[str, torch.Tensor] = {}
    modules = dict(unet.named_modules())

    def hook(path: str) -> Any:
        def fn(_m: torch.nn.Module, _i: Any, o: Any) -> None:
            out.setdefault(path, o[0] if isinstance(o, tuple) else o)

        return fn

    handles = [modules[p].register_forward_hook(hook(p)) for p in paths]
    with torch.no_grad():
        unet(x, torch.zeros(len(x), dtype=torch.long))
    for h in handles:
        h.remove()
    return out


def test_pooling_dims(unet: UNet2DModel, images: Dataset[Item]) -> None:
    x = stacked(images)
    paths = {b: resolve_block(unet, b) for b in BLOCKS}
    names = {m: p for p, m in unet.named_modules()}
    raw = raw_outputs(unet, x, [names[m] for m in paths.values()])
    shapes = {b: raw[names[m]].shape[1:] for b, m in paths.items()}
    # At 16 px: 8x8 after down1, 4x4, 2x2, 2x2, mid 2x2, then up 4x4, 8x8, 16x16, 16x16.
    assert [tuple(s[1:]) for s in shapes.values()] == [
        (8, 8), (4, 4), (2, 2), (2, 2), (2, 2), (4, 4), (8, 8), (16, 16), (16, 16)
    ]  # fmt: skip
    for pool, dim in [
        ("avg", lambda c, h, w: c),
        ("flatten", lambda c, h, w: c * h * w),
        ("avg2", lambda c, h, w: c * 4),
    ]:
        req = FeatureRequest(BLOCKS, 0, 0, pool)
        feats, _ = extract(unet, images, req, batch_size=BATCH)
        want = {b: dim(*shapes[b]) for b in BLOCKS}
        assert {b: f.shape for b, f in feats.items()} == {b: (N, want[b]) for b in BLOCKS}
        assert block_dims(unet, req, (3, RES, RES)) == want
    avg, _ = extract(unet, images, FeatureRequest(("up3",), 0, 0, "avg"), batch_size=BATCH)
    assert torch.allclose(avg["up3"], raw[names[paths["up3"]]].mean(dim=(2, 3)), atol=1e-6)


def test_pixels_with_avg_pooling_are_the_flattened_image(images: Dataset[Item]) -> None:
    # The documented choice (features.pixel_pool): the mean colour is no baseline.
    feats, _ = extract(None, images, FeatureRequest((PIXELS,), 0, 0, "avg"), batch_size=BATCH)
    assert torch.equal(feats[PIXELS], stacked(images).flatten(1))
    feats, _ = extract(None, images, FeatureRequest((PIXELS,), 0, 0, "avg2"), batch_size=BATCH)
    assert feats[PIXELS].shape == (N, 3 * 4)


@pytest.mark.parametrize("pool", ["max", "avg0", "avgx", "", "AVG", "flat"])
def test_bad_pool_names_are_user_errors(
    unet: UNet2DModel, images: Dataset[Item], pool: str
) -> None:
    with pytest.raises(UserError, match=r"avg.*flatten"):
        validate_pool(pool)
    with pytest.raises(UserError, match="pooling"):
        extract(unet, images, FeatureRequest(("up4",), 0, 0, pool))


@pytest.mark.parametrize("name", ["down5", "up0", "bogus", "up_blocks.9", "Mid"])
def test_unknown_block_names_list_the_nine(
    unet: UNet2DModel, images: Dataset[Item], name: str
) -> None:
    with pytest.raises(UserError) as err:
        extract(unet, images, FeatureRequest(("down1", name)))
    assert repr(name) in str(err.value)
    assert ", ".join(BLOCKS) in str(err.value)


def test_any_named_modules_path_is_a_block(unet: UNet2DModel, images: Dataset[Item]) -> None:
    path = "up_blocks.1.resnets.2"
    feats, _ = extract(unet, images, FeatureRequest((path, "mid")), batch_size=N)
    raw = raw_outputs(unet, stacked(images), [path])[path]
    assert torch.allclose(feats[path], raw.mean(dim=(2, 3)), atol=1e-6)
    assert resolve_block(unet, "up4") is resolve_block(unet, "up_blocks.0")


def test_a_module_called_twice_per_pass_gives_its_first_output(
    unet: UNet2DModel, images: Dataset[Item]
) -> None:
    # Each ResNet calls its one `nonlinearity` on h, on the time embedding, then on h again:
    # the features must not depend on what else the request holds (the pass stops at the last).
    path = "up_blocks.1.resnets.0.nonlinearity"
    alone, _ = extract(unet, images, FeatureRequest((path,)), batch_size=BATCH)
    with_up1, _ = extract(unet, images, FeatureRequest((path, "up1")), batch_size=BATCH)
    assert torch.equal(alone[path], with_up1[path])
    first_input = resolve_block(unet, "up_blocks.1.resnets.0.norm1")
    assert alone[path].shape == (N, first_input.num_channels)


# --- noise -------------------------------------------------------------------------------------


def test_noise_step_0_feeds_the_clean_image(
    unet: UNet2DModel, images: Dataset[Item], calls: Calls
) -> None:
    extract(unet, images, FeatureRequest(("down1",), 0, 5), batch_size=N)
    sample, timestep = calls.inputs["unet"][0][:2]
    assert torch.equal(sample, stacked(images))
    assert torch.equal(timestep, torch.zeros(N, dtype=torch.long))


@pytest.mark.parametrize("t", [1, 250, 999])
def test_noise_step_t_is_q_sample_with_per_image_noise(
    unet: UNet2DModel, images: Dataset[Item], calls: Calls, t: int
) -> None:
    extract(unet, images, FeatureRequest(("down1",), t, 5), batch_size=BATCH)
    fed = torch.cat([args[0] for args in calls.inputs["unet"]])
    x0 = stacked(images)
    noise = noise_for(torch.arange(N), x0.shape[1:], noise_seed=5, split="")
    steps = torch.full((N,), t, dtype=torch.long)
    assert torch.equal(fed, diffusion.make_scheduler().add_noise(x0, noise, steps))
    assert all(torch.equal(args[1], steps[:BATCH]) for args in calls.inputs["unet"])
    # q_sample by hand: sqrt(abar_t) x0 + sqrt(1 - abar_t) noise
    abar = diffusion.make_scheduler().alphas_cumprod[t]
    torch.testing.assert_close(fed, abar.sqrt() * x0 + (1 - abar).sqrt() * noise)


def test_noise_steps_outside_the_schedule_are_user_errors(
    unet: UNet2DModel, images: Dataset[Item]
) -> None:
    for t in (-1, 1000):
        with pytest.raises(UserError, match="noise step"):
            extract(unet, images, FeatureRequest(("down1",), t))


# --- the cache ---------------------------------------------------------------------------------


def key(**changes: Any) -> CacheKey:
    base = CacheKey("0123abcd", "ema", "digits:test:16:seed0:80-20", 16, 0, 0, "avg", "up4")
    return dataclasses.replace(base, **changes)


def spread_features(n: int = 64, d: int = 32, seed: int = 0) -> torch.Tensor:
    """Features like a block's: O(0.1) values, a spread comparable to their mean."""
    gen = torch.Generator().manual_seed(seed)
    return 0.2 + 0.1 * torch.randn(n, d, generator=gen)


def entries(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if not p.name.startswith(".lock-"))


def test_a_hit_returns_exactly_what_the_miss_returned(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path)
    x, y = spread_features(), torch.arange(64) % 10
    assert cache.get(key()) is None
    missed = cache.put(key(), x, y)
    assert missed.dtype == torch.float32
    assert torch.equal(missed, x)  # float32 as extracted: nothing rounded
    hit = cache.get(key())
    assert hit is not None
    assert torch.equal(hit[0], missed)
    assert torch.equal(hit[1], y)

    from safetensors.torch import load_file

    assert load_file(str(cache.path(key())))["features"].dtype == torch.float32


@pytest.mark.parametrize(
    "values",
    [
        pytest.param(lambda x: x * 1e6, id="beyond-float16-range"),
        pytest.param(lambda x: x * 1e-7, id="tiny-values-float16-would-flush"),
        pytest.param(lambda x: x * 1e-3 + 100.0, id="mean-far-above-spread"),
    ],
)
def test_features_of_any_range_are_stored_exactly(tmp_path: Path, values: Any) -> None:
    cache = FeatureCache(tmp_path)
    x = values(spread_features())
    missed = cache.put(key(), x, torch.zeros(64, dtype=torch.long))
    assert torch.equal(missed, x)
    hit = cache.get(key())
    assert hit is not None and torch.equal(hit[0], x)


def test_an_old_float16_entry_is_never_served(tmp_path: Path) -> None:
    """Entries were float16 when a check allowed it (it moved k-NN cells by up to 1.1 points):
    the key names the stored dtype now, so every old entry's name differs, and a float16 file
    under a new name is a miss, not a hit."""
    import hashlib
    import json

    from safetensors.torch import save_file

    old_fields = {n: v for n, v in dataclasses.asdict(key()).items() if n != "stored"}
    old_digest = hashlib.sha256(json.dumps(old_fields, sort_keys=True).encode()).hexdigest()[:32]
    assert old_digest != key().digest()
    cache = FeatureCache(tmp_path)
    tmp_path.mkdir(exist_ok=True)
    x = spread_features()
    labels = torch.zeros(64, dtype=torch.long)
    save_file({"features": x.half(), "labels": labels}, str(cache.path(key())))
    assert cache.get(key()) is None
    assert torch.equal(cache.put(key(), x, labels), x)
    hit = cache.get(key())
    assert hit is not None and torch.equal(hit[0], x)


def test_the_key_includes_every_field(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path)
    cache.put(key(), spread_features(), torch.zeros(64, dtype=torch.long))
    fields = [f.name for f in dataclasses.fields(CacheKey)]
    assert set(fields) == {
        "checkpoint",
        "weights",
        "split",
        "resolution",
        "noise_step",
        "noise_seed",
        "pool",
        "block",
        "noise_draws",
        "precision",
        "noise",
        "stored",
        "data_scheme",
    }
    digests = {key().digest()}
    for name in fields:
        value = getattr(key(), name)
        changed = key(**{name: value + 1 if isinstance(value, int) else value + "x"})
        assert cache.get(changed) is None, name
        digests.add(changed.digest())
    assert len(digests) == len(fields) + 1
    assert cache.get(key()) is not None


def test_put_writes_a_temp_file_and_renames_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = FeatureCache(tmp_path)
    renames: list[tuple[Path, Path]] = []
    real_replace = os.replace

    def replace(src: Any, dst: Any) -> None:
        assert Path(src).is_file() and not Path(dst).exists()  # complete before it appears
        renames.append((Path(src), Path(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(features.os, "replace", replace)
    cache.put(key(), spread_features(), torch.zeros(64, dtype=torch.long))
    [(src, dst)] = renames
    assert src.parent == dst.parent == tmp_path  # same filesystem: the rename is atomic
    assert src.name.startswith(".tmp-")
    assert dst == cache.path(key())
    assert entries(tmp_path) == [dst.name]


def test_a_failed_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ddsweep import integrity

    def broken(filename: str, blob: bytes) -> None:
        Path(filename).write_bytes(b"\x00" * 10)  # a partial file, then the disk is full
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(integrity, "write", broken)
    cache = FeatureCache(tmp_path)
    with pytest.raises(OSError):
        cache.put(key(), spread_features(), torch.zeros(64, dtype=torch.long))
    assert entries(tmp_path) == []
    assert cache.get(key()) is None


def test_a_concurrent_reader_never_sees_a_partial_entry(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path)
    versions = [spread_features(2048, 64, seed) for seed in range(3)]
    stored = versions
    labels = torch.zeros(2048, dtype=torch.long)
    seen: list[torch.Tensor | None] = []
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            got = cache.get(key())
            seen.append(None if got is None else got[0])

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(30):
            cache.put(key(), versions[i % 3], labels)
    finally:
        done.set()
        reader.join()
    hits = [s for s in seen if s is not None]
    assert hits, "the reader never read an entry"
    assert all(any(torch.equal(h, s) for s in stored) for h in hits)
    assert entries(tmp_path) == [cache.path(key()).name]


def test_a_damaged_entry_is_a_miss_and_is_rewritten(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path)
    cache.path(key()).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    assert cache.get(key()) is None
    cache.path(key()).write_bytes(b"")
    assert cache.get(key()) is None
    cache.put(key(), spread_features(), torch.zeros(64, dtype=torch.long))
    assert cache.get(key()) is not None


def test_lru_eviction_removes_the_least_recently_read_entry(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path)
    y = torch.zeros(64, dtype=torch.long)
    keys = {name: key(block=name) for name in "ABCDE"}
    for name in "ABC":
        cache.put(keys[name], spread_features(seed=ord(name)), y)
    size = cache.path(keys["A"]).stat().st_size
    now = time.time()
    for age, name in [(300, "A"), (200, "B"), (100, "C")]:  # written A, B, C
        os.utime(cache.path(keys[name]), (now - age, now - age))
    assert cache.get(keys["A"]) is not None  # read: A is now the most recently used

    cache.max_bytes = int(3.5 * size)
    cache.put(keys["D"], spread_features(seed=4), y)
    assert cache.get(keys["B"]) is None  # written before C, never read since
    assert all(cache.get(keys[n]) is not None for n in "ACD")  # each get refreshes the age
    for age, name in [(30, "C"), (20, "D"), (10, "A")]:
        os.utime(cache.path(keys[name]), (now - age, now - age))
    cache.put(keys["E"], spread_features(seed=5), y)
    assert {n for n in "ABCDE" if cache.path(keys[n]).exists()} == {"A", "D", "E"}


def test_eviction_leaves_other_writers_temp_files_alone(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path, max_bytes=1)
    other = tmp_path / ".tmp-abc123.safetensors"  # another process, between write and rename
    other.write_bytes(b"\x00" * 100_000)
    cache.put(key(), spread_features(), torch.zeros(64, dtype=torch.long))
    assert other.exists()


def test_cached_features_extracts_once_for_several_blocks(
    unet: UNet2DModel, images: Dataset[Item], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = FeatureCache(tmp_path)
    extracted: list[tuple[str, ...]] = []
    loads: list[int] = []
    real_extract = features.extract

    def counting_extract(*args: Any, **kwargs: Any) -> Any:
        extracted.append(args[2].blocks)
        return real_extract(*args, **kwargs)

    def loader() -> UNet2DModel:
        loads.append(1)
        return unet

    monkeypatch.setattr(features, "extract", counting_extract)
    req = FeatureRequest(("down1", "mid", "up4", PIXELS), 100, 0, "avg")
    args = (loader, "abc", "ema", images, "digits:test:first48", RES)
    began = time.perf_counter()
    first, secs, ran = cached_features(*args, req, cache, batch_size=BATCH)
    assert ran and 0 < secs <= time.perf_counter() - began  # the extraction's own time
    assert extracted == [req.blocks] and len(loads) == 1
    # The split names the images' noise: the cache extracts with it.
    direct, labels = real_extract(
        unet, images, dataclasses.replace(req, split="digits:test:first48"), batch_size=BATCH
    )
    for b in req.blocks:
        assert torch.equal(first[b][0], direct[b])
        assert torch.equal(first[b][1], labels)

    again, secs, ran = cached_features(*args, req, cache, batch_size=BATCH)
    assert (ran, secs) == (False, 0.0)
    assert len(extracted) == 1 and len(loads) == 1  # a full hit never loads the network
    for b in req.blocks:
        assert torch.equal(again[b][0], first[b][0])
        assert torch.equal(again[b][1], first[b][1])

    more = dataclasses.replace(req, blocks=("mid", "up1"))
    both, _, ran = cached_features(*args, more, cache, batch_size=BATCH)
    assert ran and extracted[-1] == ("up1",)  # only the missing block is extracted
    assert torch.equal(both["mid"][0], first["mid"][0])


# --- the cache keeps probe results ---------------------------------------------------------------


def test_cached_and_fresh_features_give_identical_predictions(
    digits_dir: Path, tmp_path: Path
) -> None:
    """A random 3-level net at 8 px on all 1,797 digits: k-NN predictions from the cache's
    entries (written, then read back) equal those from the extracted features, for every block
    and the pixels. float16 entries failed this on digits (up1: 75.3 vs 76.4)."""
    torch.manual_seed(1)
    net = build_unet(ModelConfig(resolution=8, channels=(32, 32, 32))).eval()
    blocks = (*(b for b in BLOCKS if b not in ("down4", "up4")), PIXELS)
    cache = FeatureCache(tmp_path)
    req = FeatureRequest(blocks, 0, 0, "avg")
    splits = {s: data.labelled_split("digits", s, 8, digits_dir) for s in ("train", "test")}
    fresh = {s: extract(net, ds, req, batch_size=512) for s, ds in splits.items()}
    (xtr, ytr), (xte, _) = fresh["train"], fresh["test"]
    for b in blocks:
        for s, (x, y) in fresh.items():
            cache.put(key(block=b, split=s), x[b], y)
        hits = {s: cache.get(key(block=b, split=s)) for s in fresh}
        (ctr, _), (cte, _) = (h for h in hits.values() if h is not None)
        a = probes.knn_votes(xtr[b], ytr, xte[b], ks=(20,))[20]
        c = probes.knn_votes(ctr, ytr, cte, ks=(20,))[20]
        assert torch.equal(a, c), b


# --- memory ------------------------------------------------------------------------------------


def test_check_memory_refuses_what_would_not_fit() -> None:
    dims = {"down1": 32, "up2": 32 * 16 * 16}
    assert check_memory(dims, 1000, available=2**30) == (32 + 8192) * 1000 * 4
    with pytest.raises(UserError) as err:
        check_memory(dims, 50_000, available=2**30)
    message = str(err.value)
    assert "up2" in message and "--pool avg" in message
    assert "\n" not in message


# --- noise that is independent per split, and averaged over draws -----------------------------


def test_image_i_of_train_and_image_i_of_test_get_different_noise() -> None:
    shape = (3, RES, RES)
    idx = torch.arange(5)
    train = noise_for(idx, shape, 0, split="digits:train:16:seed0:80-20")
    test = noise_for(idx, shape, 0, split="digits:test:16:seed0:80-20")
    assert not torch.equal(train, test)
    # Independent, not merely different: the same-index correlation is that of strangers.
    a, b = train.flatten(1), test.flatten(1)
    corr = (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1))
    assert corr.abs().max() < 0.1
    again = noise_for(idx, shape, 0, split="digits:train:16:seed0:80-20", draw=1)
    assert not torch.equal(train, again)


def test_a_noisy_test_image_is_not_matched_to_its_index_twin_in_train(tmp_path: Path) -> None:
    # The bug this guards against: train image i and test image i got the same noise, so on
    # digits pixels at t=250 a test image's nearest train neighbour was the one of its index.
    from ddsweep.config.probe import ProbeConfig
    from ddsweep.evaluate import split_features

    feats, _, _ = split_features(
        None, "digits", 16, (PIXELS,), 250, ProbeConfig(), FeatureCache(tmp_path), tmp_path
    )
    (xtr, ytr), (xte, yte) = feats["train"][PIXELS], feats["test"][PIXELS]
    n = min(len(xtr), len(xte))
    nearest = torch.cdist(xte[:n], xtr).argmin(dim=1)
    twins = (nearest == torch.arange(n)).float().mean().item()
    assert twins < 0.02, f"{twins:.0%} of test images have their index twin as nearest neighbour"
    # ... and the images still classify: 1-NN well above chance (10 %).
    assert (ytr[torch.cdist(xte, xtr).argmin(dim=1)] == yte).float().mean() > 0.5


def test_features_over_several_draws_are_the_mean_of_the_draws(images: Dataset[Item]) -> None:
    t, split = 300, "digits:test:first48"
    req = FeatureRequest((PIXELS,), t, 2, "flatten", split=split, noise_draws=3)
    feats, _ = extract(None, images, req, batch_size=7)
    x0 = stacked(images)
    steps = torch.full((N,), t, dtype=torch.long)
    by_hand = torch.stack(
        [
            diffusion.make_scheduler().add_noise(
                x0, noise_for(torch.arange(N), x0.shape[1:], 2, split=split, draw=d), steps
            )
            for d in range(3)
        ]
    ).mean(dim=0)
    torch.testing.assert_close(feats[PIXELS], by_hand.flatten(1), rtol=1e-5, atol=1e-6)
    one, _ = extract(None, images, dataclasses.replace(req, noise_draws=1), batch_size=7)
    assert (one[PIXELS] - feats[PIXELS]).abs().max() > 0.05
    # A clean image is the same in every draw: one pass, whatever noise_draws says.
    assert dataclasses.replace(req, noise_step=0).draws() == 1


def test_bf16_and_float32_features_never_share_a_cache_entry(
    unet: UNet2DModel, images: Dataset[Item], tmp_path: Path
) -> None:
    cache = FeatureCache(tmp_path)
    args = (lambda: unet, "abc", "ema", images, "digits:test:first48", RES)
    fp32 = FeatureRequest(("mid",), 0, 0, "avg", precision="fp32")
    _, _, ran = cached_features(*args, fp32, cache, batch_size=BATCH)
    assert ran
    _, _, ran = cached_features(*args, fp32, cache, batch_size=BATCH)
    assert not ran
    # A bf16 (CUDA autocast) request misses the float32 entry and makes its own.
    _, _, ran = cached_features(*args, dataclasses.replace(fp32, precision="bf16"), cache)
    assert ran
    # More draws at t > 0 are other features too.
    noisy = dataclasses.replace(fp32, noise_step=100)
    assert cached_features(*args, noisy, cache)[2]
    assert cached_features(*args, dataclasses.replace(noisy, noise_draws=2), cache)[2]
    assert not cached_features(*args, dataclasses.replace(noisy, noise_draws=2), cache)[2]


# --- the noise scheme ------------------------------------------------------------------------------


def _splitmix64_reference(seed: int, count: int) -> list[int]:
    """SplitMix64 in Python integers (Steele et al. 2014), as signed 64-bit values."""
    out, mask = [], (1 << 64) - 1
    state = seed & mask
    for _ in range(count):
        state = (state + 0x9E3779B97F4A7C15) & mask
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        z ^= z >> 31
        out.append(z - (1 << 64) if z >= 1 << 63 else z)
    return out


def test_splitmix64_in_torch_is_the_reference_stream() -> None:
    seeds = [0, 1, 12345, (1 << 63) - 1, features.noise_seed_of("digits:test", 7, 0)]
    got = features.splitmix64(torch.tensor(seeds, dtype=torch.int64), 9)
    for row, seed in zip(got.tolist(), seeds, strict=True):
        assert row == _splitmix64_reference(seed, 9)


def test_noise_is_standard_gaussian_and_the_same_in_any_batch() -> None:
    import numpy as np
    from scipy import stats as sps

    noise = noise_for(torch.arange(200), (3, 16, 16), 0, split="digits:train")
    assert noise.dtype == torch.float32 and noise.shape == (200, 3, 16, 16)
    flat = noise.double().flatten().numpy()
    assert abs(flat.mean()) < 0.01 and abs(flat.std() - 1) < 0.01
    assert sps.kstest(flat, "norm").pvalue > 0.01  # seeded: the same values every run
    # Neighbouring images, and an odd number of values per image, are no special case.
    odd = noise_for(torch.arange(3), (5,), 0, split="s")
    assert torch.equal(odd[1], noise_for(torch.tensor([1]), (5,), 0, split="s")[0])
    corr = np.corrcoef(noise[:, 0].flatten(1).numpy())
    assert np.abs(corr[~np.eye(200, dtype=bool)]).max() < 0.3


def test_the_noise_scheme_is_part_of_the_cache_key() -> None:
    assert features.NOISE_SCHEME == "split-index-draw-splitmix-v3"
    assert key().noise == features.NOISE_SCHEME
    assert key().digest() != dataclasses.replace(key(), noise="split-index-draw-v2").digest()
