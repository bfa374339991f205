import numpy as np
import pytest

from baffle_edge.perturb import SHARED_CLIENT, noise, philox4x32, words

# Random123 known-answer vectors for Philox4x32-10
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]

# the published vectors of docs/noise.md section 4
VECTORS = [
    ((0, 0, 0, 0), "6627e8d5 e169c58d bc57ac4c 9b00dbd8 f8e4cca4 5cb200db b1a574eb 097eff67",
     "3f7dbb30 bf6cb6b3 bf1e1ba1 bef6d1aa be1d534f 3e392a6b 3f54ec98 3e4a2d9b",
     "-+-+-+--+++-+------++-+++--++--+-+--+++-"),
    ((42, 7, 3, 11), "0032ed9a 98ced435 a97df25b 239a0f5a 4f25870d 9ea8a315 6b2983d9 78471bba",
     "c046a9a5 c00a847f 3f153ce2 3f3243e1 bf8f2bf3 bf860ae9 bfa5e645 3e7e9a44",
     "+-+--++--+--+---+-++--++++++++++-+-+--++"),
    ((2**63 + 1, 1, SHARED_CLIENT, 0), "3a1de9c0 70749f26 eea059f3 20152893 a48cf6d5 86fd7bc1 b879b8fa 9331de91",
     "bfcc92dd 3f2423ad 3e8774bc 3e8801b1 bf6d265b be245c8f bf38a95a bebc1ebc",
     "++++++---++-+----+---++++-+---+++--++-++"),
]


@pytest.mark.parametrize("ctr,key,expected", KAT)
def test_philox_known_answers(ctr, key, expected):
    assert [int(x) for x in philox4x32(ctr, key)] == list(expected)


@pytest.mark.parametrize("key,w,gbits,rad", VECTORS)
def test_published_vectors(key, w, gbits, rad):
    seed, round_, client, k = key
    assert [f"{x:08x}" for x in words(seed, round_, client, k, 8)] == w.split()
    g = noise(seed, round_, client, k, 8, "gaussian")
    assert [f"{x:08x}" for x in g.view(np.uint32)] == gbits.split()
    r = noise(seed, round_, client, k, 40, "rademacher")
    assert "".join("+" if v > 0 else "-" for v in r) == rad


def test_fast_stream_equals_reference_philox():
    for seed, round_, client, k, n in [(1, 2, 3, 4, 1001), (2**64 - 1, 2**32 - 1, 0, 2**32 - 1, 9)]:
        blocks = -(-n // 4)
        ref = philox4x32((np.arange(blocks), k, client, round_), (seed & 0xFFFFFFFF, seed >> 32))
        assert np.array_equal(words(seed, round_, client, k, n), ref.T.reshape(-1)[:n])


def test_same_key_same_stream_and_prefix_property():
    a = noise(7, 3, 2, 5, 1000)
    assert np.array_equal(a, noise(7, 3, 2, 5, 1000))
    assert np.array_equal(a[:333], noise(7, 3, 2, 5, 333))  # odd d drops the last partner only


@pytest.mark.parametrize("change", [(1, 0, 0, 0), (0, 1, 0, 0), (0, 0, 1, 0), (0, 0, 0, 1)])
def test_any_key_word_changes_the_stream(change):
    base = (11, 4, 3, 2)
    other = tuple(b + c for b, c in zip(base, change))
    for kind in ("gaussian", "rademacher"):
        a, b = noise(*base, 4096, kind), noise(*other, 4096, kind)
        assert np.mean(a == b) < 0.6  # independent streams: only chance agreement


def test_moments():
    g = noise(0, 0, 0, 0, 400_000)
    assert g.dtype == np.float32
    assert abs(g.mean()) < 0.01 and abs(g.var() - 1) < 0.01
    assert abs(np.mean(g**4) - 3) < 0.05  # Gaussian kurtosis
    r = noise(0, 0, 0, 0, 400_000, "rademacher")
    assert set(np.unique(r)) == {-1.0, 1.0} and abs(r.mean()) < 0.01


@pytest.mark.parametrize("bad", [dict(seed=-1), dict(seed=2**64), dict(k=2**32), dict(round_=-1)])
def test_out_of_range_key_words_are_rejected(bad):
    args = dict(seed=0, round_=0, client=0, k=0, d=4) | bad
    with pytest.raises(ValueError):
        noise(**args)


def test_unknown_kind():
    with pytest.raises(ValueError):
        noise(0, 0, 0, 0, 4, "uniform")


def test_gaussian_chunks_are_the_unchunked_stream():
    from baffle_edge.perturb import GAUSSIAN_CHUNK, box_muller, noise, words
    for d in (GAUSSIAN_CHUNK + 1, 2 * GAUSSIAN_CHUNK + 3, 3 * GAUSSIAN_CHUNK):
        whole = box_muller(words(7, 1, 2, 3, d + (d & 1)))[:d]
        assert np.array_equal(noise(7, 1, 2, 3, d), whole)
    assert np.array_equal(words(7, 1, 2, 3, 8, first_block=5), words(7, 1, 2, 3, 28)[20:])
    with pytest.raises(ValueError, match="blocks"):
        words(7, 1, 2, 3, 8, first_block=2**32 - 1)
