"""Tiny ONNX stand-ins with the signatures of insightface's models, for the tiny presets, tests and offline runs.

The real insightface packs (antelopev2, buffalo_l) are licensed non-commercial and are not
downloaded by imagegen. To exercise the real loading path (``insightface.app.FaceAnalysis`` and
``model_zoo``'s shape-based routing, SCRFD decoding, ArcFace alignment) without them, these
functions build small ONNX graphs with ``onnx.helper`` that route the same way:

- :func:`pixel_scrfd_detector_model`: the detector of the stand-in packs. It looks at the pixels: the
  16-px cells of the detector input whose mean colour is most skin-like (a Gaussian around a skin tone in
  YCbCr, smoothed over 5x5 cells) give at most one face, with a 128-px box and template landmarks around
  it; a blank, grey or noise image gives none. It finds the face of the bundled astronaut portrait, and
  also a brown table: it is not a face model, and is marked as a stand-in like the others.
- :func:`scrfd_detector_model`: an SCRFD "bnkps" detector signature (``det_10g`` /
  ``scrfd_10g_bnkps``): input ``1x3xHxW`` (dynamic H, W), 9 outputs = scores, box distances and
  keypoint distances for strides 8, 16, 32 with 2 anchors per cell, rank-2 outputs
  (``[N, 1]``, ``[N, 4]``, ``[N, 10]``). insightface routes any model with >= 5 outputs to SCRFD
  and 9 outputs means ``use_kps``. The graph ignores the pixels: it reports one face, with a
  fixed high score at the first stride-32 anchor, at a fixed place of the (letterboxed)
  detector input, with plausible 5-point landmarks.
- :func:`arcface_recognizer_model`: an ArcFace signature (``glintr100`` / ``w600k_r50``): input
  ``Nx3x112x112``, output ``Nx512``. insightface routes square inputs >= 112 divisible by 16 to
  ``ArcFaceONNX``. The graph is a fixed random projection of the average-pooled aligned crop:
  deterministic, and different crops give different vectors, but it knows nothing about faces.

Every generated model carries the metadata key :data:`STANDIN_METADATA_KEY`; the insightface
backend reads it and marks its ``model_version`` with ``+standin`` so a stand-in can never be
mistaken for the real pack in a report or a cache key.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

#: ONNX metadata key present in every generated stand-in model
from imagegen.faces.base import STANDIN_METADATA_KEY  # noqa: E402  (re-exported: where stand-ins are marked)

#: file names of the detector and recognizer in each pack (as in the real zips)
PACK_FILES: dict[str, tuple[str, str]] = {
    "antelopev2": ("scrfd_10g_bnkps.onnx", "glintr100.onnx"),
    "buffalo_l": ("det_10g.onnx", "w600k_r50.onnx"),
}
OPSET = 17
IR_VERSION = 8

#: where the stand-in detector puts its face, in pixels of the 640x640 detector input
DEFAULT_FACE_BOX = (224.0, 160.0, 416.0, 400.0)
#: its 5 landmarks in the same coordinates (left eye, right eye, nose, mouth left, mouth right)
DEFAULT_FACE_LANDMARKS = ((272.0, 250.0), (368.0, 250.0), (320.0, 300.0), (282.0, 345.0), (358.0, 345.0))
STRIDES = (8, 16, 32)


def _const(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array), name=name)


def _finish(graph: onnx.GraphProto, description: str) -> onnx.ModelProto:
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="imagegen.standins.faces",
        doc_string=description,
    )
    model.ir_version = IR_VERSION
    helper.set_model_props(model, {STANDIN_METADATA_KEY: description})
    onnx.checker.check_model(model, full_check=True)
    return model


def scrfd_detector_model(
    *,
    face_box: tuple[float, float, float, float] = DEFAULT_FACE_BOX,
    landmarks: tuple[tuple[float, float], ...] = DEFAULT_FACE_LANDMARKS,
    score: float = 0.99,
) -> onnx.ModelProto:
    """An SCRFD-signature detector that always reports one face at ``face_box``.

    Coordinates are pixels of the detector input (insightface letterboxes the image into it,
    top-left aligned, then divides by its scale). The face comes from the first anchor of
    stride 32, whose centre is (0, 0), so the box distances are simply ``coords / 32``.
    """
    stride = STRIDES[-1]
    x0, y0, x1, y1 = face_box
    box_dist = np.array([[-x0, -y0, x1, y1]], dtype=np.float32) / stride
    kps_dist = np.asarray(landmarks, dtype=np.float32).reshape(1, 10) / stride

    initializers = [
        _const("axis0", np.array(0, dtype=np.int64)),
        _const("score_value", np.array(score, dtype=np.float32)),
        _const("box_dist", box_dist),
        _const("kps_dist", kps_dist),
    ]

    def first_anchor(p: str) -> list:
        # score_value at the first anchor of the stride-32 grid, 0 elsewhere
        return [
            helper.make_node("CumSum", [f"{p}_ones", "axis0"], [f"{p}_index"], name=f"{p}_index"),
            helper.make_node("Equal", [f"{p}_index", "one"], [f"{p}_first"], name=f"{p}_first"),
            helper.make_node("Cast", [f"{p}_first"], [f"{p}_onehot"], name=f"{p}_onehot", to=TensorProto.FLOAT),
            helper.make_node("Mul", [f"{p}_onehot", "score_value"], [f"score_{stride}"], name=f"{p}_score"),
        ]

    return _scrfd_model(
        "scrfd_standin",
        "tiny SCRFD-signature stand-in detector (fixed output); not a face model",
        [],
        initializers,
        stride,
        first_anchor,
    )


def _scrfd_model(name, description, nodes, initializers, scored_stride, score_nodes) -> onnx.ModelProto:
    """The SCRFD "bnkps" signature around ``nodes``: for every stride, two anchors per cell of its grid (interleaved
    like insightface's anchor centres), each with the box ``box_dist`` and landmarks ``kps_dist`` (initializers the
    caller supplies, in stride units from the anchor); scores from ``score_nodes(prefix)`` at ``scored_stride``
    (it must output ``score_<stride>``; ``{prefix}_ones`` is a column of ones, one per anchor), zeros elsewhere."""
    nodes = [*nodes, helper.make_node("ReduceMean", ["input.1"], ["grey"], name="grey", axes=[1], keepdims=1)]
    initializers = [
        *initializers,
        _const("flat_shape", np.array([-1, 1], dtype=np.int64)),
        _const("zero", np.array(0.0, dtype=np.float32)),
        _const("one", np.array(1.0, dtype=np.float32)),
    ]
    outputs: dict[str, list] = {"score": [], "bbox": [], "kps": []}
    for s in STRIDES:
        p = f"s{s}"
        nodes += [
            helper.make_node(
                "AveragePool", ["grey"], [f"{p}_pool"], name=f"{p}_pool", kernel_shape=[s, s], strides=[s, s]
            ),
            helper.make_node("Reshape", [f"{p}_pool", "flat_shape"], [f"{p}_cells"], name=f"{p}_cells"),
            helper.make_node("Concat", [f"{p}_cells", f"{p}_cells"], [f"{p}_pair"], name=f"{p}_pair", axis=1),
            helper.make_node("Reshape", [f"{p}_pair", "flat_shape"], [f"{p}_anchors"], name=f"{p}_anchors"),
            helper.make_node("Mul", [f"{p}_anchors", "zero"], [f"{p}_zeros"], name=f"{p}_zeros"),
            helper.make_node("Add", [f"{p}_zeros", "one"], [f"{p}_ones"], name=f"{p}_ones"),
            helper.make_node("MatMul", [f"{p}_ones", "box_dist"], [f"bbox_{s}"], name=f"{p}_bbox"),
            helper.make_node("MatMul", [f"{p}_ones", "kps_dist"], [f"kps_{s}"], name=f"{p}_kps"),
        ]
        if s == scored_stride:
            nodes += score_nodes(p)
        else:
            nodes.append(helper.make_node("Identity", [f"{p}_zeros"], [f"score_{s}"], name=f"{p}_score"))
        outputs["score"].append(helper.make_tensor_value_info(f"score_{s}", TensorProto.FLOAT, [f"n{s}", 1]))
        outputs["bbox"].append(helper.make_tensor_value_info(f"bbox_{s}", TensorProto.FLOAT, [f"n{s}", 4]))
        outputs["kps"].append(helper.make_tensor_value_info(f"kps_{s}", TensorProto.FLOAT, [f"n{s}", 10]))
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, "height", "width"])],
        outputs["score"] + outputs["bbox"] + outputs["kps"],
        initializer=initializers,
    )
    return _finish(graph, description)


def arcface_recognizer_model(*, input_size: int = 112, embedding_dim: int = 512, seed: int = 0) -> onnx.ModelProto:
    """An ArcFace-signature recognizer: ``Nx3xSxS`` aligned crop -> ``Nx<embedding_dim>``.

    8x8 average pooling of the crop, flattened (192 values), times a fixed random matrix
    (``seed``). The default signature is that of ``glintr100.onnx`` / ``w600k_r50.onnx``.
    """
    if input_size < 112 or input_size % 16:
        raise ValueError("insightface routes only square inputs >= 112 and divisible by 16 to ArcFace")
    rng = np.random.default_rng(seed)
    cell = input_size // 8
    weight = (rng.standard_normal((3 * 8 * 8, embedding_dim)) / np.sqrt(3 * 8 * 8)).astype(np.float32)
    nodes = [
        # node names must not start with "Sub"/"Mul": insightface would then assume an mxnet
        # export with built-in normalisation (ArcFaceONNX checks the first 8 node names)
        helper.make_node(
            "AveragePool", ["input.1"], ["pooled"], name="pool", kernel_shape=[cell, cell], strides=[cell, cell]
        ),
        helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten", axis=1),
        helper.make_node("MatMul", ["flat", "projection"], ["embedding"], name="project"),
    ]
    graph = helper.make_graph(
        nodes,
        "arcface_standin",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["batch", 3, input_size, input_size])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", embedding_dim])],
        initializer=[_const("projection", weight)],
    )
    return _finish(
        graph, f"tiny ArcFace-signature stand-in recognizer ({embedding_dim}-d random projection); not a face model"
    )


def write_scrfd_detector(path: str | Path, **kwargs) -> Path:
    """Write :func:`scrfd_detector_model` to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(scrfd_detector_model(**kwargs), str(path))
    return path


def write_arcface_recognizer(path: str | Path, **kwargs) -> Path:
    """Write :func:`arcface_recognizer_model` to ``path`` (e.g. ``.../glintr100.onnx``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(arcface_recognizer_model(**kwargs), str(path))
    return path


def write_tiny_pack(root: str | Path, pack: str = "antelopev2") -> Path:
    """A stand-in insightface pack at ``<root>/models/<pack>/`` (insightface's layout).

    Writes the detector and recognizer under the real pack's file names (see :data:`PACK_FILES`)
    plus a ``STANDIN.txt`` note; returns the pack directory. Idempotent.
    """
    if pack not in PACK_FILES:
        raise ValueError(f"unknown pack {pack!r}; stand-ins exist for {', '.join(PACK_FILES)}")
    pack_dir = Path(root) / "models" / pack
    detector, recognizer = PACK_FILES[pack]
    write_scrfd_detector(pack_dir / detector)
    write_arcface_recognizer(pack_dir / recognizer)
    (pack_dir / "STANDIN.txt").write_text(
        "Tiny random-weight stand-ins written by imagegen.standins.faces for tests and offline\n"
        "runs. They have the signatures of the real models but detect and recognise nothing.\n"
    )
    return pack_dir


def genderage_model(*, apparent_age: float = 40.0) -> onnx.ModelProto:
    """A ``genderage``-signature attribute model: ``Nx3x96x96`` face crop -> ``Nx3``.

    insightface routes 96x96 inputs to its ``Attribute`` model and reads a 3-wide output as
    (female, male, age / 100). This stand-in answers ``apparent_age`` for every face (the pixels
    only enter multiplied by zero), which is what a test of the apparent-age *gate* needs.
    """
    answer = np.array([[0.5, 0.5, apparent_age / 100.0]], dtype=np.float32)
    nodes = [
        helper.make_node("ReduceMean", ["data"], ["mean"], name="pool", axes=[1, 2, 3], keepdims=1),
        helper.make_node("Flatten", ["mean"], ["flat"], name="flatten", axis=1),
        helper.make_node("Mul", ["flat", "zero"], ["ignored"], name="ignore_pixels"),
        helper.make_node("Add", ["ignored", "answer"], ["fc1"], name="answer_add"),
    ]
    graph = helper.make_graph(
        nodes,
        "genderage_standin",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, ["batch", 3, 96, 96])],
        [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, ["batch", 3])],
        initializer=[
            _const("zero", np.zeros((1, 1), dtype=np.float32)),
            _const("answer", answer),
        ],
    )
    return _finish(graph, f"tiny genderage-signature stand-in: every face is {apparent_age:g} years old")


def write_genderage_model(path: str | Path, **kwargs) -> Path:
    """Write :func:`genderage_model` to ``path`` (e.g. ``.../buffalo_l/genderage.onnx``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(genderage_model(**kwargs), str(path))
    return path


#: the skin tone the pixel stand-in detector looks for (YCbCr, 8-bit), its spread, and the darkest cell it accepts
SKIN_CR, SKIN_CB, SKIN_SPREAD, SKIN_MIN_LUMA = 148.0, 110.0, 18.0, 60.0
PIXEL_CELL = 16
PIXEL_BOX = 128.0
#: 5 landmarks as fractions of the box (eyes, nose, mouth corners), roughly an FFHQ-aligned face
PIXEL_LANDMARKS = ((0.34, 0.40), (0.66, 0.40), (0.50, 0.58), (0.37, 0.76), (0.63, 0.76))


def pixel_scrfd_detector_model() -> onnx.ModelProto:
    """An SCRFD-signature detector that looks at the pixels (see the module doc): at most one face.

    insightface feeds SCRFD ``(pixel - 127.5) / 128`` in RGB order. Scores come from the stride-16 grid (two
    anchors per cell, both with the cell's score; NMS keeps one); strides 8 and 32 report nothing.
    """
    cell = PIXEL_CELL
    half = PIXEL_BOX / 2
    # box and landmarks relative to the anchor (the cell's top-left corner), in stride units
    centre = cell / 2
    box_dist = np.array([[half - centre, half - centre, half + centre, half + centre]], dtype=np.float32) / cell
    kps = [(centre + (fx - 0.5) * PIXEL_BOX, centre + (fy - 0.5) * PIXEL_BOX) for fx, fy in PIXEL_LANDMARKS]
    kps_dist = np.asarray(kps, dtype=np.float32).reshape(1, 10) / cell
    # [Y, Cr - SKIN_CR, Cb - SKIN_CB] of 8-bit RGB as one 1x1 convolution
    to_ycc = np.array(
        [
            [0.299, 0.587, 0.114],
            [0.713 * 0.701, -0.713 * 0.587, -0.713 * 0.114],
            [-0.564 * 0.299, -0.564 * 0.587, 0.564 * 0.886],
        ],
        dtype=np.float32,
    )
    initializers = [
        _const("to_255_scale", np.array(128.0, dtype=np.float32)),
        _const("to_255_shift", np.array(127.5, dtype=np.float32)),
        _const("ycc_weight", to_ycc.reshape(3, 3, 1, 1)),
        _const("ycc_bias", np.array([-SKIN_MIN_LUMA, 128.0 - SKIN_CR, 128.0 - SKIN_CB], dtype=np.float32)),
        _const("chroma_scale", np.array(1.0 / SKIN_SPREAD, dtype=np.float32)),
        _const("luma_scale", np.array(0.5, dtype=np.float32)),
        _const("split", np.array([1, 2], dtype=np.int64)),
        _const("box_dist", box_dist),
        _const("kps_dist", kps_dist),
    ]
    nodes = [
        helper.make_node(
            "AveragePool", ["input.1"], ["cells"], name="cells", kernel_shape=[cell, cell], strides=[cell, cell]
        ),
        helper.make_node("Mul", ["cells", "to_255_scale"], ["cells_scaled"], name="to_255"),
        helper.make_node("Add", ["cells_scaled", "to_255_shift"], ["rgb"], name="to_255_shift"),
        helper.make_node("Conv", ["rgb", "ycc_weight", "ycc_bias"], ["ycc"], name="ycc"),
        helper.make_node("Split", ["ycc", "split"], ["luma", "chroma"], name="split_ycc", axis=1),
        helper.make_node("Mul", ["chroma", "chroma_scale"], ["chroma_z"], name="chroma_z"),
        helper.make_node("Mul", ["chroma_z", "chroma_z"], ["chroma_sq"], name="chroma_sq"),
        helper.make_node("ReduceSum", ["chroma_sq", "sum_axis"], ["distance"], name="distance", keepdims=1),
        helper.make_node("Neg", ["distance"], ["neg_distance"], name="neg_distance"),
        helper.make_node("Exp", ["neg_distance"], ["tone"], name="tone"),
        helper.make_node("Mul", ["luma", "luma_scale"], ["luma_z"], name="luma_z"),
        helper.make_node("Sigmoid", ["luma_z"], ["bright"], name="bright"),
        helper.make_node("Mul", ["tone", "bright"], ["skin"], name="skin"),
        helper.make_node(
            "AveragePool", ["skin"], ["region"], name="region", kernel_shape=[5, 5], strides=[1, 1], pads=[2, 2, 2, 2]
        ),
        helper.make_node("ReduceMax", ["region"], ["best"], name="best", keepdims=1),
        helper.make_node("GreaterOrEqual", ["region", "best"], ["is_best"], name="is_best"),
        helper.make_node("Cast", ["is_best"], ["best_mask"], name="best_mask", to=TensorProto.FLOAT),
        helper.make_node("Mul", ["region", "best_mask"], ["face_score"], name="face_score"),
        helper.make_node("Reshape", ["face_score", "flat_shape"], ["face_cells"], name="face_cells"),
        helper.make_node("Concat", ["face_cells", "face_cells"], ["face_pair"], name="face_pair", axis=1),
        helper.make_node("Reshape", ["face_pair", "flat_shape"], [f"score_{cell}"], name="face_anchors"),
    ]
    initializers.append(_const("sum_axis", np.array([1], dtype=np.int64)))
    return _scrfd_model(
        "scrfd_pixel_standin",
        "tiny SCRFD-signature stand-in detector (most skin-coloured region); not a face model",
        nodes,
        initializers,
        cell,
        lambda prefix: [],  # score_16 is computed above
    )
