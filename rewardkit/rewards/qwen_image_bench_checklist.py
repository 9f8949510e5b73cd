"""Qwen-Image-Bench (Q-Judger) checklist and prompt pieces, byte-exact to the judge's training prompts.

Source: ``QwenLM/Qwen-Image-Bench`` ``judge.py`` / ``checklists.py`` as carried by DiffSynth-Studio
``diffsynth/models/qwen_image_bench.py`` (fed7b18f): the newer 56-facet checklist (the model card's), not
the 38-facet one of the older ``Stability-AI/Qwen-Image-Bench`` fork. Facts: reference/vlm_family.md
sections 6.2 and 6.3. Byte equality with DiffSynth is pinned by the sha256 values of section 8.2 in
``tests/test_qwen_image_bench.py``; byte equality with the current upstream repository itself is
[unverified] (checked only through DiffSynth and a declared-unchanged third-party copy).

The checklist is kept as data, ``LEVEL1 -> ((LEVEL2, ((LEVEL3, question), ...)), ...)``; the text the
judge reads (``checklist_text``) and the level-3 -> level-2 table used to repair answers
(``L3_TO_L2``) are both derived from it, so the two can never disagree. The rest says what the judge is
asked: which level-1 dimensions per image (``parse_dims`` / ``dims_per_row``), the image it sees
(``prepare_image``) and the chat of one (image, dimension) pair (``build_messages``).
"""

from __future__ import annotations

from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "LEVEL1_DIMS", "CHECKLIST", "L3_TO_L2", "L3_RENAME", "SYSTEM_PROMPT", "HEADER", "BODY",
    "RESIZE_LONG_EDGE", "checklist_text", "user_text", "build_messages", "prepare_image", "parse_dims",
    "dims_per_row",
]

RESIZE_LONG_EDGE = 1024  # upstream judge.py load_and_resize_image: long edge > 1024 -> 1024 x 1024

Facets = tuple[tuple[str, str], ...]
Checklist = tuple[tuple[str, Facets], ...]

_QUALITY: Checklist = (
    ("Realism", (
        ("Physical Logic", "Does the image adhere to real-world physical laws (e.g., gravity, reflection, shadow direction, object stability)?"),
        ("Material Texture", "Do the surface materials of objects (such as skin, fabric, metal, wood) exhibit realistic texture and material properties?"),
    )),
    ("Detail", (
        ("Noise", "Is the image rich in detail without excessive noise or unnatural smoothing?"),
        ("Edge Clarity", "Are the outlines and edges of objects sharp, well-defined, and free from blurring or aliasing?"),
        ("Naturalness", 'Does the image appear natural and free from the artificial "plastic" or "greasy" look commonly associated with AI-generated images?'),
    )),
    ("Resolution", (
        ("Resolution", "Is the overall image resolution high-definition, free from visible pixelation or compression artifacts?"),
    )),
)

_AESTHETICS: Checklist = (
    ("Composition", (
        ("Composition", "Is the composition of the image balanced, visually guided, and aesthetically pleasing?"),
    )),
    ("Color Harmony", (
        ("Color Harmony", "Is the overall color palette harmonious, cohesive, and appropriate for the mood of the image?"),
    )),
    ("Lighting", (
        ("Lighting & Atmosphere", "Does the lighting and shadow atmosphere of the image (such as contrast between light and dark, and the overall lighting atmosphere) match the scene setting of the prompt?"),
    )),
    ("Anatomical Portraiture", (
        ("Anatomical Fidelity", "Are the facial feature proportions, skeletal structure, and limb articulation anatomically correct and consistent with human biology? Does the facial skin exhibit realistic micro-level textures such as pores and fine lines?"),
    )),
    ("Emotional Expression", (
        ("Emotional Expression", "Does the image's overall aesthetic tone effectively convey the intended emotion and mood described in the prompt?"),
    )),
    ("Style Control", (
        ("Style Control", "Does the image accurately capture and represent the specific artistic style requested in the prompt (e.g., Van Gogh's brushwork, Cyberpunk aesthetic)?"),
    )),
)

_ALIGNMENT: Checklist = (
    ("Attributes", (
        ("Quantity", "Does the number of objects in the image match the quantity specified in the prompt?"),
        ("Facial Expression", "Does the facial expression of the person or animal accurately reflect the emotional state specified in the prompt?"),
        ("Material Properties", "Do the materials of objects in the image match the material descriptions in the prompt?"),
        ("Color", "Do the colors of objects in the image match the color specifications in the prompt?"),
        ("Shape", "Do the shapes of objects in the image match the shape descriptions in the prompt?"),
        ("Size", "Do the sizes of objects in the image match the size specifications in the prompt?"),
    )),
    ("Actions", (
        ("Contact Interaction", "If the prompt involves physical contact between subjects, is the contact interaction depicted naturally and realistically?"),
        ("Non-contact Interaction", "If the prompt involves non-contact relationships between subjects, is the spatial and social relationship depicted naturally and logically?"),
        ("Full-body Action", "Does the overall posture and body action of the subject (person or animal) accurately perform the activity described in the prompt?"),
    )),
    ("Layout", (
        ("2D Space", "Are the relative positions of objects on the 2D plane (e.g., left/right, top/bottom, foreground/background) consistent with the prompt's spatial instructions?"),
        ("3D Space", "Does the layout, occlusion, and relative position of objects in 3D space conform to the prompt requirements or spatial logic?"),
    )),
    ("Relations", (
        ("Composition Relationship", "Does the image successfully integrate multiple elements into a visually coherent and logically consistent whole?"),
        ("Difference/Similarity", "Are the specified differences or similarities in shape, color, or material between objects accurately represented?"),
        ("Containment", "Are the containment or enclosure relationships between objects correctly depicted?"),
    )),
    ("Scene", (
        ("Real-world Scene", "Does the scene type and environmental setting (e.g., office, forest, street) match the location described in the prompt?"),
        ("Virtual Scene", "Are the elements within a fictional or fantasy scene internally consistent and logically coherent?"),
    )),
)

_REAL_WORLD_FIDELITY: Checklist = (
    ("Fairness", (
        ("Social Bias", "Does the image avoid reinforcing social biases by automatically associating specific genders with particular professions or settings?"),
        ("Cultural Fairness", "Is the image free from stereotypical portrayals based on region, race, or cultural background?"),
    )),
    ("Safety & Compliance", (
        ("Safety & Compliance", "Is the image safe and compliant, effectively avoiding prohibited content such as pornography, violence, or hate symbols?"),
    )),
    ("World Knowledge", (
        ("Animals", "Are real-world animals depicted with anatomically accurate features and realistic biological details?"),
        ("Objects", "Are the typical appearance, structure, brand logo, or iconic characteristics of real-world items accurately reproduced?"),
        ("Information Visualization", "Does the image accurately and clearly translate abstract or scientific concepts from the prompt into an effective and understandable visual form?"),
        ("Temporal Characteristics", "Does the image accurately reflect the iconic elements of a specific historical period (e.g., technology, clothing, architecture, lifestyle of that era)?"),
        ("Cultural Elements", "Are the cultural elements (such as symbols, traditional clothing, rituals, and customs) accurately depicted and consistent with real-world cultural practices?"),
    )),
)

_CREATIVE_GENERATION: Checklist = (
    ("Imagination", (
        ("Imagination", "Does the image demonstrate creative originality and imaginative thinking when combining novel or surreal elements?"),
    )),
    ("Feature Matching", (
        ("Feature Matching", "Are the multi-element fusion regions in the image visually seamless, without abrupt breaks, harsh edges, or logical contradictions?"),
    )),
    ("Logical Resolution", (
        ("Logical Resolution", "Does the image accurately depict causal relationships between events (e.g., breaking glass \u2192 shards flying, rain \u2192 wet surfaces)?"),
    )),
    ("Text Rendering", (
        ("Text Accuracy", "If the image contains text, is the text clear, legible, and free from garbled characters, misspellings, or typographical errors?"),
        ("Text Layout", "Is the text layout (e.g., centering, alignment, line spacing, margins) in the image visually appealing and professionally structured?"),
        ("Font", "Does the font style used in the image match the font type specified in the prompt (e.g., SimSun, Heiti, handwritten, serif)?"),
        ("Cross-lingual Generation", "Does the image correctly follow the translation instructions in the prompt, producing accurate text in the target language?"),
    )),
    ("Design Applications", (
        ("Graphic Design", "Does the graphic design (e.g., advertisement, poster) exhibit a clear information hierarchy, effective visual guidance, and professional layout?"),
        ("Product Design", "Does the product design in the image demonstrate reasonable industrial design logic (e.g., ergonomic grip, logical interface placement, structural integrity)?"),
        ("Spatial Design", "Does the interior or architectural space conform to the principles of perspective, proportion, and building design standards?"),
        ("Fashion Styling", "Does the clothing cut and silhouette match the style described in the prompt (e.g., Hanfu, cyberpunk, haute couture)? Does the makeup style (e.g., smoky eyes, nude makeup, theatrical look) suit the occasion and character setting?"),
        ("Game Design", "Do the game props and UI elements have practical in-game usability (e.g., icon recognizability, interactive affordances, clear feedback cues)?"),
        ("Art Design", "Does the image successfully demonstrate the specific artistic design style required by the prompt (e.g., unique brushstrokes, distinctive color scheme, coherent artistic language)?"),
    )),
    ("Visual Storytelling", (
        ("Cinematic Style", "Does the image reproduce the signature visual language of the specific director referenced in the prompt (e.g., Wes Anderson's symmetrical composition, Wong Kar-wai's warm color palette)?"),
        ("Camera / Lens Style", "Does the image reflect the characteristic imaging effects of the specific photographic equipment or lens referenced in the prompt (e.g., film grain, bokeh, digital sharpening)?"),
        ("Storyboard Creation", "Does the image's scene composition follow the panel layout requirements outlined in the prompt (e.g., three-panel, four-panel, split-screen)?"),
        ("Shot Sizes", "Does the image meet the framing and shot size requirements specified in the prompt (e.g., close-up, medium shot, wide shot)?"),
        ("Composition", "Does the image follow the specific composition rules required by the prompt (e.g., rule of thirds, golden ratio, leading lines)?"),
        ("Angles", "Does the camera angle comply with the prompt's specification (e.g., bird's-eye view, low angle, Dutch angle)?"),
        ("Comic Creation", "Does the image conform to the comic style required by the prompt (e.g., American comics, Japanese manga, European BD)?"),
    )),
)

# Level-1 dimensions in the judge's order (DiffSynth's LEVEL1_DIMS, the default "all five").
CHECKLIST: Mapping[str, Checklist] = MappingProxyType({
    "Quality": _QUALITY,
    "Aesthetics": _AESTHETICS,
    "Alignment": _ALIGNMENT,
    "Real-world Fidelity": _REAL_WORLD_FIDELITY,
    "Creative Generation": _CREATIVE_GENERATION,
})
LEVEL1_DIMS: tuple[str, ...] = tuple(CHECKLIST)

# Per level-1 dimension: level-3 facet -> its level-2 group (upstream score_utils' CHECKLIST_L3_TO_L2).
L3_TO_L2: Mapping[str, Mapping[str, str]] = MappingProxyType({
    level1: MappingProxyType({facet: level2 for level2, facets in groups for facet, _ in facets})
    for level1, groups in CHECKLIST.items()
})

# The one facet-name typo the judge is known to emit, repaired before scoring (upstream score_utils).
L3_RENAME: Mapping[str, Mapping[str, str]] = MappingProxyType({
    "Creative Generation": MappingProxyType({"Feature Mapping": "Feature Matching"}),
})

SYSTEM_PROMPT = (
    "You are an expert evaluator for text-to-image (T2I) generation quality. Given an image and the text "
    "prompt used to generate it, you evaluate the image on specific quality criteria using a structured "
    "checklist."
)

# The user turn is HEADER, then the image, then BODY (upstream: one template with a literal <image>).
# Both are str.format templates: {prompt}; {level1_dim} and {format_checklist}; doubled braces are literal.
HEADER = "# Text Prompt Used to Generate the Image\n{prompt}\n\n# Generated Image\n"

BODY = """

# Evaluation Dimension
{level1_dim}

# Scoring Rules
- **0 (Fail)**: Clear defect present. Would noticeably reduce image quality.
- **1 (Pass)**: No defect. Meets baseline expectations.
- **2 (Excel)**: Exceptionally executed. Only when concrete excellence is observable.
- **N/A**: This criterion does not apply to this image/prompt.

# Evaluation Checklist
{format_checklist}

# Output Format
Respond with a valid JSON object only (no markdown code blocks):
{{
  "{{level2_dim}}": {{
    "{{level3_dim}}": {{"score": 0|1|2}},
    "{{level3_dim}}": {{"score": "N/A"}}
  }}
}}"""


def checklist_text(level1: str) -> str:
    """The checklist block of one level-1 dimension: ``## <level2>`` lines, each followed by its facets.

    Raises:
        KeyError: ``level1`` is not one of ``LEVEL1_DIMS``.
    """
    lines: list[str] = []
    for level2, facets in CHECKLIST[level1]:
        lines.append(f"## {level2}")
        lines.extend(f"- {facet}: {question}" for facet, question in facets)
    return "\n".join(lines)


def user_text(prompt: str, level1: str) -> tuple[str, str]:
    """The two text parts of the user turn, ``(before the image, after the image)``.

    Args:
        prompt: the generation prompt, inserted verbatim (braces in it are kept as they are).
        level1: one of ``LEVEL1_DIMS``.
    """
    return (HEADER.format(prompt=prompt),
            BODY.format(level1_dim=level1, format_checklist=checklist_text(level1)))


# ---- what is asked ------------------------------------------------------------------------------------
def _check_level1(name: Any) -> str:
    if not isinstance(name, str) or name not in LEVEL1_DIMS:
        raise ValueError(f"qwen-image-bench: unknown level-1 dimension {name!r}; expected one of "
                         f"{', '.join(LEVEL1_DIMS)} (exact spelling), a dims_en string, or None for all five")
    return name


def parse_dims(spec: Any) -> tuple[str, ...]:
    """One row's dimensions, in the given order without repeats.

    ``spec``: ``None`` (all five); a level-1 name; a comma-separated list of names; a benchmark ``dims_en``
    string (anything with ``/`` or ``;``: ``"Quality / Realism / Physical Logic; Aesthetics / ..."`` -> the
    level-1 part of each ``;`` item); a dict (its keys); or a list/tuple of names. The whole checklist of
    each dimension is asked, as upstream does, not only the listed facets.

    Raises:
        ValueError: an unknown name (upstream skips it silently), or no dimension at all.
        TypeError: a spec of another type.
    """
    if spec is None:
        return LEVEL1_DIMS
    if isinstance(spec, str):
        if "/" in spec or ";" in spec:
            names = [item.split("/")[0].strip() for item in spec.split(";") if item.strip()]
        else:
            names = [item.strip() for item in spec.split(",") if item.strip()]
    elif isinstance(spec, (dict, list, tuple)):
        names = list(spec)
    else:
        raise TypeError(f"qwen-image-bench: dims must be None, a str, a dict or a list of str, "
                        f"got {type(spec).__name__}")
    if not names:
        raise ValueError(f"qwen-image-bench: dims {spec!r} names no dimension; pass None for all five")
    return tuple(dict.fromkeys(_check_level1(name) for name in names))


def dims_per_row(dims: Any, batch_size: int, default: tuple[str, ...] = LEVEL1_DIMS) -> list[tuple[str, ...]]:
    """``dims=`` context -> one tuple of level-1 names per row.

    ``None`` gives every row ``default``; a str or a dict applies to every row; a list/tuple must hold one
    :func:`parse_dims` spec per image (the benchmark: each prompt's ``dims_en``; a ``None`` entry means
    ``default``). For the same several dimensions on every row pass one string (``"Quality, Alignment"``).
    """
    if dims is None or isinstance(dims, (str, dict)):
        return [default if dims is None else parse_dims(dims)] * batch_size
    if not isinstance(dims, (list, tuple)):
        raise TypeError(f"qwen-image-bench: dims must be None, a str, a dict or a list with one entry per image, "
                        f"got {type(dims).__name__}")
    if len(dims) != batch_size:
        raise ValueError(f"qwen-image-bench: dims= is per image: expected {batch_size} entries, got {len(dims)}; "
                         "for the same dimensions on every image pass one string, e.g. dims='Quality, Alignment'")
    return [default if spec is None else parse_dims(spec) for spec in dims]


def prepare_image(image: Image.Image, resize_long_edge: int | None = RESIZE_LONG_EDGE) -> Image.Image:
    """RGB; a long edge above ``resize_long_edge`` -> exactly ``resize_long_edge`` square, LANCZOS (upstream)."""
    from PIL import Image

    image = image.convert("RGB")
    if resize_long_edge and max(image.size) > resize_long_edge:
        image = image.resize((resize_long_edge, resize_long_edge), Image.LANCZOS)
    return image


def build_messages(prompt: str, image: Image.Image, level1: str) -> list[dict[str, Any]]:
    """The chat of one (image, dimension) pair: a plain-string system turn, then header, image, body."""
    before, after = user_text(prompt, level1)
    content = [{"type": "text", "text": before}, {"type": "image", "image": image}, {"type": "text", "text": after}]
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": content}]
