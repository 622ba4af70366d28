"""An invisible watermark that survives re-encoding and resizing: dwtDctSvd at a canonical scale, RS-coded.

**The mark.** The ``dwtDctSvd`` embedding of ``invisible-watermark`` (the family SDXL's mark
belongs to), re-implemented vectorised so it can run at a *canonical scale*: the image is
resized to ``CANONICAL`` x ``CANONICAL`` px, the U channel's Haar LL band is cut into 4x4
blocks, and each block's largest singular value of its DCT is quantised to carry one bit
(quantisation step ``SCALE``). The change is computed at the canonical size, resized back to the
image's own size and added to its U channel. A detector resizes whatever it gets to the same
canonical size, so a resize between 0.5x and 2x (and any aspect change) lands on the same
blocks; the original embedded at the image's native size and lost the block grid after any resize.

**The payload.** 6 bytes, a 16-bit marker (``MAGIC``) and the 32-bit tag (first 8 hex digits of
the image id, which finds the audit record), Reed-Solomon coded with ``PARITY_BYTES`` parity
bytes (``reedsolo``): 96 bits, spread cyclically over the 4096 blocks (about 42 votes a bit).
Votes are soft (how far each block sits from the decision boundary) and summed per bit; the
RS decoder corrects up to 3 wrong bytes, or 4 when 2 of them are the least-confident bytes
(declared erasures). A mark is *found* only when the codeword decodes **and** the corrected
marker equals ``MAGIC``: for an unmarked image the chance is ~1e-10 per candidate below.

**What the detector tries.** The whole image at canonical scale; then brightness gains (the
U channel's distance from neutral scaled by 1/1.1 ... 1/0.9, a brightness change scales it);
then centred crops from 99% to ``MIN_CROP`` of each side (the image is placed back where it sat
in the canonical frame, only whole blocks vote). Off-centre crops are not searched: they lose it.

**Old marks.** Images stamped before issue 16 (48 plain bits at native scale) are still
recognised when the new mark is absent (``imwatermark``'s decoding, vectorised: one more pass),
reported as scheme ``legacy-...``: their tag has no error correction, and they never survived
resizing.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import cv2
import numpy as np
from PIL import Image

SCHEME = "dwtDctSvd-canonical512-rs6"
LEGACY_SCHEME = "legacy-dwtDctSvd-48"
CANONICAL = 512
BLOCK = 4
#: quantisation step of the blocks' largest singular value (the legacy mark used 36; 48 keeps the tag through
#: JPEG 50 at 512 px, PSNR ~42 dB: see docs/benchmarks.md)
SCALE = 48.0
MAGIC = 0xA16E
MAGIC_BITS = 16
TAG_BITS = 32
MESSAGE_BYTES = (MAGIC_BITS + TAG_BITS) // 8
PARITY_BYTES = 6
CODE_BITS = (MESSAGE_BYTES + PARITY_BYTES) * 8
#: embedding passes: the second re-centres blocks the resize back to native size moved
PASSES = 2
MIN_WATERMARK_SIDE = 256
#: a copy shared at half size may be smaller than what was marked: the detector reads down to this
MIN_DETECT_SIDE = 128
#: smallest centred crop (fraction of each side) the detector searches
MIN_CROP = 0.75
CROP_STEP = 0.01
#: brightness gains the detector undoes (1 first)
GAINS = (1.0, 1 / 1.1, 1 / 0.9, 1 / 1.05, 1 / 0.95)
#: legacy: at most this many of its 16 marker bits may differ
LEGACY_MAX_MAGIC_ERRORS = 1
LEGACY_BITS = 48
LEGACY_SCALE = 36.0
EXEMPT_REASON = f"exempt: smaller than {MIN_WATERMARK_SIDE} px a side (the mark needs at least that)"


def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    m = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2 / n)
    m[0] /= np.sqrt(2)
    return m


_DCT = _dct_matrix(BLOCK)


@lru_cache(maxsize=1)
def _codec():
    from reedsolo import RSCodec

    return RSCodec(PARITY_BYTES)


def codeword_bits(tag: int) -> np.ndarray:
    """The 96 coded bits of ``tag`` (marker + tag + RS parity), most significant bit first."""
    if not 0 <= tag < 1 << TAG_BITS:
        raise ValueError(f"a watermark tag has {TAG_BITS} bits")
    message = MAGIC.to_bytes(2, "big") + tag.to_bytes(4, "big")
    coded = bytes(_codec().encode(message))
    return np.unpackbits(np.frombuffer(coded, dtype=np.uint8))


def watermarkable(image: Image.Image) -> bool:
    return min(image.size) >= MIN_WATERMARK_SIDE


# -- colour: cv2's uint8 YUV formulas, in float (only U changes) ---------------------------------
#: U = 0.492 (B - Y) + 128 with Y = 0.299 R + 0.587 G + 0.114 B, as one weight per channel (one matmul)
U_WEIGHTS = np.array([-0.492 * 0.299, -0.492 * 0.587, 0.492 * (1 - 0.114)])
#: a change of U by d moves B by d / 0.492 and G by -(0.114 / 0.587) of that, so that Y and V stay
B_PER_U = 1 / 0.492
G_PER_B = -0.114 / 0.587


def _u_channel(rgb: np.ndarray) -> np.ndarray:
    """The U channel of ``rgb`` (float; uint8 pixels give float32)."""
    pixels = rgb.astype(np.float32) if rgb.dtype == np.uint8 else rgb
    return pixels @ U_WEIGHTS.astype(pixels.dtype) + pixels.dtype.type(128.0)


def _add_to_u(rgb: np.ndarray, delta_u: np.ndarray) -> np.ndarray:
    """The uint8 ``rgb`` with ``delta_u`` (float32) added to its U channel, Y and V unchanged: only B and G move,
    and R is copied as it was.

    Each channel is ``clip(rint(channel + delta))``: OpenCV's ``add`` into uint8 on the split channels computes
    exactly that (a float32 sum, rounded half to even, saturated) in half numpy's time on strided channels.
    """
    red, green, blue = cv2.split(rgb)
    delta_b = delta_u * delta_u.dtype.type(B_PER_U)
    blue = cv2.add(blue, delta_b, dtype=cv2.CV_8U)
    green = cv2.add(green, delta_b * delta_u.dtype.type(G_PER_B), dtype=cv2.CV_8U)
    return cv2.merge([red, green, blue])


def _resize(array: np.ndarray, width: int, height: int) -> np.ndarray:
    h, w = array.shape[:2]
    shrinking = width * height < w * h
    return cv2.resize(array, (width, height), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_CUBIC)


# -- blocks ------------------------------------------------------------------------------------
def _blocks(band: np.ndarray) -> np.ndarray:
    rows, cols = band.shape[0] // BLOCK, band.shape[1] // BLOCK
    view = band[: rows * BLOCK, : cols * BLOCK].reshape(rows, BLOCK, cols, BLOCK).transpose(0, 2, 1, 3)
    return view.reshape(rows * cols, BLOCK, BLOCK)


def _unblocks(blocks: np.ndarray, rows: int, cols: int) -> np.ndarray:
    return blocks.reshape(rows, cols, BLOCK, BLOCK).transpose(0, 2, 1, 3).reshape(rows * BLOCK, cols * BLOCK)


def _haar_ll(u: np.ndarray) -> np.ndarray:
    """The LL band of a one-level Haar DWT (``pywt.dwt2(u, "haar")[0]``): each 2x2 pixel block's sum / 2,
    which is twice its mean (``cv2.resize``'s area average halving each side)."""
    h, w = u.shape[0] // 2 * 2, u.shape[1] // 2 * 2
    return cv2.resize(u[:h, :w], (w // 2, h // 2), interpolation=cv2.INTER_AREA) * 2


def _embed_canonical(u: np.ndarray, bits: np.ndarray) -> np.ndarray:
    """The change to the U channel ``u`` (canonical size) that quantises ``bits`` into its blocks.

    Only the Haar LL band changes, so the inverse DWT of the change is each LL change / 2 spread
    over its 2x2 pixels.
    """
    ca = _haar_ll(u)
    rows, cols = ca.shape[0] // BLOCK, ca.shape[1] // BLOCK
    blocks = _blocks(ca)
    coeffs = _DCT @ blocks @ _DCT.T
    left, largest, right = _top_singular(coeffs)
    phase = 0.25 + 0.5 * bits[np.arange(len(blocks)) % len(bits)].astype(np.float64)
    # the nearest value whose phase carries the bit (the legacy mark stayed in the value's own step: 30% more change)
    target = (np.round(largest / SCALE - phase) + phase) * SCALE
    change = left[:, :, None] * (target - largest)[:, None, None] * right[:, None, :]
    delta_ll = np.zeros_like(ca)
    delta_ll[: rows * BLOCK, : cols * BLOCK] = _unblocks(_DCT.T @ change @ _DCT, rows, cols)
    delta = np.zeros_like(u)
    delta[: delta_ll.shape[0] * 2, : delta_ll.shape[1] * 2] = np.repeat(np.repeat(delta_ll / 2, 2, axis=0), 2, axis=1)
    return delta


def _top_singular(matrices: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(left vector, largest singular value, right vector) of each 4x4 matrix: what the embedding changes.

    The right vector comes from the same power iteration the detector uses (``_right_vector``), the
    value and left vector from ``M v``: the same marks as ``np.linalg.svd``'s first triple (at most a
    pixel in 10^5 one level apart at 1024 px), 3x faster over a whole embedding.
    """
    right = _right_vector(_gram(matrices))
    image = np.einsum("nij,nj->ni", matrices, right)
    largest = np.linalg.norm(image, axis=1)
    return image / (largest[:, None] + 1e-300), largest, right


def _largest_singular(matrices: np.ndarray, iterations: int = 12) -> np.ndarray:
    """Largest singular value of each 4x4 matrix by power iteration on M^T M (vectorised; the DC term
    dominates these blocks, so a few iterations reach float precision): 30x faster than batched SVD."""
    gram = _gram(matrices)
    vector = _right_vector(gram, iterations)
    return np.sqrt(np.maximum(np.einsum("ni,nij,nj->n", vector, gram, vector), 0.0))


def _gram(matrices: np.ndarray) -> np.ndarray:
    """``M^T M`` of each 4x4 matrix (a batched matmul: half the time of the equivalent ``einsum``)."""
    return np.matmul(np.swapaxes(matrices, 1, 2), matrices)


def _right_vector(gram: np.ndarray, iterations: int = 12) -> np.ndarray:
    """Each Gram matrix's leading eigenvector: ``G^iterations`` applied to (1/2, ...), normalised, i.e. that many
    steps of power iteration, a matrix's top right singular vector.

    The power is taken by squaring (``G^12 v = G^8 (G^4 v)``: three 4x4 products and two products with the vector
    instead of twelve), each power scaled by its trace so nothing overflows; the same vector to ~1e-16.
    """
    vector = np.full(gram.shape[:2], 0.5)
    power = gram / (np.einsum("nii->n", gram)[:, None, None] + 1e-300)
    remaining = iterations
    while remaining:
        if remaining & 1:
            vector = np.einsum("nij,nj->ni", power, vector)
            vector /= np.linalg.norm(vector, axis=1, keepdims=True) + 1e-300
        remaining >>= 1
        if remaining:
            power = np.matmul(power, power)
            power /= np.einsum("nii->n", power)[:, None, None] + 1e-300
    return vector


def _phases(u: np.ndarray, scale: float = SCALE) -> np.ndarray:
    """Per block (raster order), where its largest singular value sits in its quantisation step (0..1)."""
    sing = _largest_singular(_DCT @ _blocks(_haar_ll(u)) @ _DCT.T)
    return np.mod(sing, scale) / scale


def _soft_votes(u: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """Per coded bit, the sum of the blocks' soft votes (> 0: a 1; 0.25 of a step votes -1, 0.75 votes +1)."""
    votes = -np.sin(2 * np.pi * _phases(u))
    if valid is not None:
        votes = np.where(valid, votes, 0.0)
    return np.bincount(np.arange(len(votes)) % CODE_BITS, weights=votes, minlength=CODE_BITS)


def embed(image: Image.Image, tag: int) -> Image.Image:
    """``image`` (RGB) carrying ``tag``; the caller checks :func:`watermarkable` first."""
    rgb = np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
    height, width = rgb.shape[:2]
    bits = codeword_bits(tag)
    u = _u_channel(rgb)
    # each pass changes U alone (Y and V stay), so a pass reads U + the changes so far: the pixels are
    # touched once, at the end, in the two channels that move
    total = None
    for _ in range(PASSES):
        canonical = _resize(u if total is None else u + total, CANONICAL, CANONICAL).astype(np.float64)
        change = _resize(_embed_canonical(canonical, bits).astype(np.float32), width, height)
        total = change if total is None else np.add(total, change, out=total)
    return Image.fromarray(_add_to_u(rgb, total))


# -- detection ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Candidate:
    """Where the detector looks: a centred crop of ``crop`` of each side, brightness undone by ``gain``."""

    crop: float = 1.0
    gain: float = 1.0


def candidates() -> list[Candidate]:
    out = [Candidate(1.0, gain) for gain in GAINS]
    steps = int(round((1 - MIN_CROP) / CROP_STEP))
    out += [Candidate(round(1 - CROP_STEP * i, 4), 1.0) for i in range(1, steps + 1)]
    return out


def _canonical_u(whole: np.ndarray, candidate: Candidate) -> tuple[np.ndarray, np.ndarray | None]:
    """The canonical-frame U channel for ``candidate`` and which blocks hold real pixels (None: all).

    ``whole``: the U channel of the image as received, resized to the canonical frame. A centred crop
    of ``crop`` of each side sat, in the original's frame, in the middle ``crop`` of it: ``whole`` is
    shrunk back there (a resize is linear, so brightness's gain applies to the resized channel).
    """
    u = whole if candidate.gain == 1.0 else 128.0 + (whole - 128.0) * candidate.gain
    if candidate.crop >= 1.0:
        return u, None
    span = CANONICAL * candidate.crop
    offset = (CANONICAL - span) / 2
    scale = candidate.crop
    shift = offset + 0.5 * scale - 0.5  # pixel centres, as cv2.resize places them
    matrix = np.array([[scale, 0, shift], [0, scale, shift]], dtype=np.float64)
    frame = cv2.warpAffine(u, matrix, (CANONICAL, CANONICAL), flags=cv2.INTER_LINEAR, borderValue=128.0)
    pixel = 2 * BLOCK  # a block of the LL band covers this many canonical pixels
    starts = np.arange(CANONICAL // pixel) * pixel
    inside = (starts >= offset) & (starts + pixel <= offset + span)
    valid = (inside[:, None] & inside[None, :]).reshape(-1)
    return frame, valid


def _decode_votes(votes: np.ndarray) -> tuple[int, int] | None:
    """(tag, corrected bytes) when the votes decode to a codeword with the marker, else None."""
    from reedsolo import ReedSolomonError

    bits = (votes > 0).astype(np.uint8)
    word = bytearray(np.packbits(bits).tobytes())
    confidence = np.abs(votes).reshape(-1, 8).min(axis=1)
    attempts: list[list[int] | None] = [None, sorted(np.argsort(confidence)[:2].tolist())]
    for erase in attempts:
        try:
            message, _, errata = _codec().decode(word, erase_pos=erase)
        except ReedSolomonError:
            continue
        if int.from_bytes(message[:2], "big") == MAGIC:
            return int.from_bytes(message[2:6], "big"), len(errata)
    return None


def detect(image: Image.Image, *, search: bool = True) -> dict[str, Any]:
    """Look for the mark; ``search`` False tries the whole image at gain 1 only."""
    if min(image.size) < MIN_DETECT_SIDE:
        return {"checked": False, "found": False, "reason": f"smaller than {MIN_DETECT_SIDE} px a side"}
    u_native = _u_channel(np.asarray(image.convert("RGB")))
    whole = _resize(u_native, CANONICAL, CANONICAL).astype(np.float64)
    tried = 0
    for candidate in candidates() if search else [Candidate()]:
        tried += 1
        u, valid = _canonical_u(whole, candidate)
        votes = _soft_votes(u, valid)
        decoded = _decode_votes(votes)
        if decoded is not None:
            tag, corrected = decoded
            return {
                "checked": True,
                "found": True,
                "scheme": SCHEME,
                "tag": f"{tag:08x}",
                "corrected_bytes": corrected,
                "crop": candidate.crop,
                "gain": round(candidate.gain, 4),
                "candidates_tried": tried,
            }
    legacy = detect_legacy(image)
    if legacy["found"]:
        return {**legacy, "candidates_tried": tried}
    return {"checked": True, "found": False, "scheme": None, "tag": None, "candidates_tried": tried}


def detect_legacy(image: Image.Image) -> dict[str, Any]:
    """The pre-issue-16 mark: 48 plain bits (marker + tag) at native scale, decoded as ``imwatermark`` does
    (hard votes of every block, averaged per bit), vectorised."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float64)
    height, width = rgb.shape[:2]
    u = np.rint(_u_channel(rgb[: height // 4 * 4, : width // 4 * 4]))
    hard = (_phases(u, LEGACY_SCALE) > 0.5).astype(np.float64)
    counts = np.bincount(np.arange(len(hard)) % LEGACY_BITS, minlength=LEGACY_BITS)
    bits = (np.bincount(np.arange(len(hard)) % LEGACY_BITS, weights=hard, minlength=LEGACY_BITS) / counts) > 0.5
    magic = np.array([(MAGIC >> (MAGIC_BITS - 1 - i)) & 1 for i in range(MAGIC_BITS)], dtype=bool)
    errors = int(np.sum(bits[:MAGIC_BITS] != magic))
    found = errors <= LEGACY_MAX_MAGIC_ERRORS
    tag = int("".join("1" if b else "0" for b in bits[MAGIC_BITS:]), 2)
    return {
        "checked": True,
        "found": found,
        "scheme": LEGACY_SCHEME if found else None,
        "magic_bit_errors": errors,
        "tag": f"{tag:08x}" if found else None,
    }
