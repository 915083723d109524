"""Safety hash lists: file format, URL/byte/PDQ matching, with generated lists."""

from __future__ import annotations

import hashlib
import io

import pytest
from PIL import Image

from laion_tasks.config import HashListsConfig
from laion_tasks.hashlists import HashListError, HashLists, parse_hashlist, pdq_hash
from tests.tag_fixtures import jpeg_bytes, make_image


def write(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_no_lists_configured_gives_none():
    assert HashLists.from_config(HashListsConfig()) is None


def test_list_format_prefixes_comments_and_inferred_algorithms(tmp_path):
    md5 = hashlib.md5(b"a").hexdigest()
    sha1 = hashlib.sha1(b"b").hexdigest()
    sha256 = hashlib.sha256(b"c").hexdigest()
    text = f"# a comment\n\nmd5:{md5.upper()}  # trailing comment\n{sha1}\n  SHA256:{sha256}\n"
    parsed = parse_hashlist(text, "list.txt", "image")
    assert parsed == {"md5": {bytes.fromhex(md5)}, "sha1": {bytes.fromhex(sha1)}, "sha256": {bytes.fromhex(sha256)}}
    # in a PDQ list an unprefixed 64-hex line is PDQ, not sha256
    assert set(parse_hashlist(sha256, "pdq.txt", "pdq")) == {"pdq"}


@pytest.mark.parametrize(
    "text, kind, message",
    [
        ("md5:abc\n", "image", "list.txt:1: md5 digest must be 32"),
        ("\n\nsha1:" + "a" * 40, "url", "list.txt:3: algorithm 'sha1' not allowed in a url list"),
        ("z" * 32, "image", "list.txt:1: not hexadecimal"),
        ("crc32:" + "a" * 8, "image", "list.txt:1: algorithm 'crc32'"),
    ],
)
def test_malformed_lists_name_file_and_line(text, kind, message):
    with pytest.raises(HashListError, match=message):
        parse_hashlist(text, "list.txt", kind)


def test_url_hashes_are_of_the_exact_utf8_string(tmp_path):
    listed = "https://bad.example/ä/img.jpg"
    other = "https://bad.example/ä/img2.jpg"
    text = f"{hashlib.md5(listed.encode('utf-8')).hexdigest()}\nsha256:{hashlib.sha256(other.encode()).hexdigest()}\n"
    lists = HashLists.from_config(HashListsConfig(url=write(tmp_path, "urls.txt", text)))
    assert lists is not None
    assert lists.url_blocked(listed)
    assert lists.url_blocked(other)
    # no normalisation: case, trailing slash or a different scheme are different URLs
    assert not lists.url_blocked(listed.upper())
    assert not lists.url_blocked(listed + "/")
    assert not lists.url_blocked(listed.replace("https", "http"))
    assert lists.matches["url"] == 2


@pytest.mark.parametrize("algo", ["md5", "sha1", "sha256"])
def test_image_bytes_hashes(tmp_path, algo):
    data = jpeg_bytes(make_image(1))
    lists = HashLists.from_config(
        HashListsConfig(image=write(tmp_path, "img.txt", f"{algo}:{hashlib.new(algo, data).hexdigest()}\n"))
    )
    assert lists is not None
    assert lists.image_blocked(data)
    assert not lists.image_blocked(data + b"\0")
    assert not lists.image_blocked(jpeg_bytes(make_image(2)))


def test_pdq_matches_re_encoded_and_resized_copies_but_not_other_images(tmp_path):
    original = make_image(7, size=256)
    digest, quality = pdq_hash(original)
    assert len(digest) == 32 and quality > 0
    lists = HashLists.from_config(HashListsConfig(pdq=write(tmp_path, "pdq.txt", f"pdq:{digest.hex()}\n")))
    assert lists is not None
    recompressed = Image.open(io.BytesIO(jpeg_bytes(original.resize((180, 180)), quality=60)))
    assert lists.pdq_blocked(original)
    assert lists.pdq_blocked(recompressed)
    assert not any(lists.pdq_blocked(make_image(s, size=256)) for s in range(20, 30))


def test_pdq_threshold_is_the_hamming_distance(tmp_path):
    digest, _ = pdq_hash(make_image(3, size=128))
    flipped = bytearray(digest)
    for byte in range(4):  # 4 bytes fully flipped = 32 bits away
        flipped[byte] ^= 0xFF
    lists = HashLists(pdq_max_distance=31)
    lists.set_pdq([bytes(flipped)])
    assert not lists.pdq_hash_blocked(digest)[0]
    lists.pdq_max_distance = 32
    assert lists.pdq_hash_blocked(digest)[0]


def test_pdq_hex_is_facebook_canonical_order():
    """Canonical hex = 16-bit words w[15]..w[0]; pdqhash's vector is bit 255 first, so packbits must agree."""
    import numpy as np
    import pdqhash

    arr = np.asarray(make_image(5, size=64).convert("RGB"))
    vector, _ = pdqhash.compute(arr)
    digest, _ = pdq_hash(Image.fromarray(arr))
    bits = "".join(str(int(b)) for b in vector)
    assert digest.hex() == f"{int(bits, 2):064x}"


def test_image_blocked_reuses_a_given_sha256(tmp_path):
    """The download stage hashes each body once and hands the digest over; the answer is the same."""
    data = b"some image bytes"
    lists = HashLists.from_config(
        HashListsConfig(image=write(tmp_path, "img.txt", f"sha256:{hashlib.sha256(data).hexdigest()}\n"))
    )
    assert lists is not None
    assert lists.image_blocked(data, sha256=hashlib.sha256(data).digest())
    assert lists.image_blocked(data)
    assert not lists.image_blocked(data, sha256=hashlib.sha256(b"other").digest())
