r"""UnifiedReward 2.0 and UnifiedReward Edit: prompt builders and answer parsers (pure functions).

Prompt texts are byte-exact copies of the upstream templates, pinned by hash in the tests:
* UR2: ``CodeGoat24/UnifiedReward`` ``inference_qwen/UnifiedReward-2.0-inference/point_score_ACS_image_generation.py``
  (``variant="upstream"``) and DiffSynth-Studio ``diffsynth/models/unified_reward_2.py`` ``_build_prompt``
  (``variant="diffsynth"``, one extra sentence);
* UR-Edit: ``CodeGoat24/UnifiedReward`` ``UnifiedReward-Edit/{edit_pointwise_instruction_following,
  edit_pairwise_rank,edit_paiwise_score}.py`` (DiffSynth's copies are identical).

The parsers follow DiffSynth-Studio ``diffsynth/models/{unified_reward_2,unified_reward_edit}.py`` with three
fixes (reference/vlm_family.md §4.3, §5.3, §9): only the text after the last ``</think>`` is read; a failure is
NaN with a reason, never 0 and never a tie; the rank verdict is read from the sentence that states it, so
"Compared with Image 1, Image 2 is better" ranks image 2 (``rank_parser="diffsynth"`` keeps DiffSynth's
first-match regexes, which rank image 1 there). Smaller differences: a score list must hold exactly two numbers
(DiffSynth takes the first ones), ``score = [a, b]`` is read as well as ``score: [a, b]``, the JSON block is also
tried without trailing commas (so upstream's own format yields ``reasoning``), and the pairwise-score fallback
excludes ``\n \r - + digits`` as intended (DiffSynth's ``[^\n\r-+\d]`` is a range from ``\r`` to ``+`` that also
excludes spaces). Reasons read ``"<kind>: <detail>"``; the judge counts failures by kind.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from rewardkit.vlm.judge import ParsedAnswer

__all__ = ["UR2_VARIANTS", "EDIT_TASKS", "EDIT_IMAGE_COUNTS", "RANK_PARSERS", "ur2_prompt", "edit_prompt",
           "answer_text", "parse_ur2", "parse_edit_pointwise", "parse_edit_rank", "parse_edit_pairwise_score"]

UR2_VARIANTS = ("upstream", "diffsynth")
EDIT_TASKS = ("edit_pointwise_score", "edit_pairwise_rank", "edit_pairwise_score")
EDIT_IMAGE_COUNTS = {"edit_pointwise_score": 2, "edit_pairwise_rank": 3, "edit_pairwise_score": 3}  # [source, edit(s)]
RANK_PARSERS = ("fixed", "diffsynth")
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
_SLOT = "\x00SLOT\x00"  # where the caption / instruction goes (never in a prompt text)

_UR2_HEAD = "\n".join((
    "You are presented with a generated image and its associated text caption. Your task is to analyze the image across multiple dimensions in relation to the caption. Specifically:",
    "Provide overall assessments for the image along the following axes (each rated from 1 to 5):",
    "- Alignment Score: How well the image matches the caption in terms of content.",
    "- Coherence Score: How logically consistent the image is (absence of visual glitches, object distortions, etc.).",
    "- Style Score: How aesthetically appealing the image looks, regardless of caption accuracy.",
    "",
    "Output your evaluation using the format below:",
    "",
    "Alignment Score (1-5): X",
    "Coherence Score (1-5): Y",
    "Style Score (1-5): Z",
    "",
    "",
))
_UR2_DIFFSYNTH_EXTRA = ("Do not include explanations, analysis, bullet points, or any text outside the requested "
                        "output format.\n\n")
_UR2_TAIL = f"Your task is provided as follows:\nText Caption: [{_SLOT}]"
_UR2_TEMPLATES = {"upstream": _UR2_HEAD + _UR2_TAIL, "diffsynth": _UR2_HEAD + _UR2_DIFFSYNTH_EXTRA + _UR2_TAIL}

_EDIT_POINTWISE = "\n".join((
    "You are a professional digital artist. You will have to evaluate the effectiveness of the AI-generated image(s) based on given rules.",
    "All the input images are AI-generated. All human in the images are AI-generated too. so you need not worry about the privacy confidentials.",
    "",
    "IMPORTANT: You will have to give your output in this way (Keep your reasoning concise and short.):",
    "{", "", '"reasoning" : "...",', '"score" : [...],', "}", "",
    "RULES:", "",
    "Two images will be provided: The first being the original AI-generated image and the second being an edited version of the first.",
    "The objective is to evaluate how successfully the editing instruction has been executed in the second image.",
    "", "Note that sometimes the two images might look identical due to the failure of image edit.", "", "",
    "From scale 0 to 25: ",
    "A score from 0 to 25 will be given based on the success of the editing. (0 indicates that the scene in the edited image does not follow the editing instruction at all. 25 indicates that the scene in the edited image follow the editing instruction text perfectly.)",
    "A second score from 0 to 25 will rate the degree of overediting in the second image. (0 indicates that the scene in the edited image is completely different from the original. 25 indicates that the edited image can be recognized as a minimal edited yet effective version of original.)",
    "Put the score in a list such that output score = [score1, score2], where 'score1' evaluates the editing success and 'score2' evaluates the degree of overediting.",
    "", f"Editing instruction:{_SLOT}", "",
))
_EDIT_INPUTS = "\n".join((
    "**Inputs Provided:**", "- Source Image (before editing)", "- Edited Image 1 (after applying the instruction)",
    "- Edited Image 2 (after applying the instruction)", "- Text Instruction", "",
    "### Evaluation Criteria for Each Image:", "",
    "1. **Instruction Fidelity**  ",
    "Assess how accurately the edits align with the given instruction. The following aspects should be considered:",
    '- **Semantic Accuracy:** Does the edited image reflect the correct objects and changes as described in the instruction? For example, if instructed to replace "apples with oranges," ensure that oranges appear instead of other fruits.',
    "- **Completeness of Changes:** Ensure all parts of the instruction are fully addressed. For multi-step instructions, verify that every change is made as specified.",
    "- **Exclusivity of Changes:** Confirm that only the specified changes were made. Other elements of the image should remain consistent with the original.",
    "",
    "2. **Visual Integrity & Realism**  ",
    "Evaluate the visual quality of the edited image, taking into account technical accuracy and aesthetic appeal:",
    "- **Realism & Physical Consistency:** Does the edit respect the laws of physics and scene consistency, including lighting, shadows, and perspective?",
    "- **Artifact-Free Quality:** Look for any technical flaws such as blurring, pixel misalignment, unnatural textures, or visible seams. The image should be clean and free from distractions.",
    "- **Aesthetic Harmony:** The image should maintain a pleasing visual balance, with careful attention to composition, color harmony, and overall appeal. The changes should enhance the image rather than detract from it.",
    "", "",
))
_EDIT_RANK = "\n".join((
    "You are tasked with comparing two edited images and determining which one is better based on the given criteria.",
    "",
    "The evaluation will consider how well each model executed the instructions and the overall quality of the edit, including its visual appeal.",
    "", _EDIT_INPUTS + "### Final Output:",
    "Based on the above evaluation, determine which edited image is better.",
    "", f"Text instruction - {_SLOT}", "",
))
_EDIT_PAIR_SCORE = "\n".join((
    "You are tasked with assigning scores to two edited images, comparing each with the original source image. ",
    "",
    "The score should reflect both how well the model executed the instructions and the overall quality of the edit, including its visual appeal for both images.",
    "", _EDIT_INPUTS + "### Scoring Guidelines:",
    "- The score can range from **positive to negative** based on how well the edit follows the instruction and maintains visual quality.",
    "- A **higher score** indicates a strong adherence to the instruction, clean edits, and a high-quality final result.",
    "- A **negative score** reflects significant issues, such as errors in the edits, missing parts, over-editing, or visual artifacts that compromise the result.",
    "", "Please provide the scores for each image based on the evaluation of the above aspects.",
    "", f"Text instruction - {_SLOT}", "",
))
_EDIT_TEMPLATES = dict(zip(EDIT_TASKS, (_EDIT_POINTWISE, _EDIT_RANK, _EDIT_PAIR_SCORE)))


def _choose(value: str, allowed: tuple[str, ...] | dict, what: str) -> str:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; choose one of {tuple(allowed)}")
    return value


def ur2_prompt(caption: str | None, variant: str = "upstream") -> str:
    """The UnifiedReward 2.0 user text for one caption (``None`` -> ``""``, as DiffSynth).

    Args:
        caption: the text prompt the image was generated from.
        variant: ``"upstream"`` (CodeGoat24's text) or ``"diffsynth"`` (adds "Do not include explanations, ...").
    """
    return _UR2_TEMPLATES[_choose(variant, UR2_VARIANTS, "prompt_variant")].replace(_SLOT, caption or "")


def edit_prompt(instruction: str | None, task: str = "edit_pointwise_score") -> str:
    """The UnifiedReward Edit user text of ``task`` for one editing instruction (``None`` -> ``""``)."""
    return _EDIT_TEMPLATES[_choose(task, EDIT_TASKS, "task")].replace(_SLOT, instruction or "")


# ---- parsers -------------------------------------------------------------------------------------------
_NUMBER = r"[-+]?\d*\.?\d+"  # DiffSynth's number pattern (signed, optional decimals)
_UR2_LABELS = (("alignment", "Alignment Score"), ("coherence", "Coherence Score"), ("style", "Style Score"))
UR2_FIELDS = tuple(key for key, _ in _UR2_LABELS)


def answer_text(text: str, *, thinking: bool = False) -> tuple[str | None, str | None]:
    """The part of an answer to parse: what follows the last ``</think>`` (all of it without one).

    Args:
        text: the decoded completion.
        thinking: the chat template opened a ``<think>`` block (``enable_thinking=True``), so an answer
            without ``</think>`` is reasoning that was cut off.

    Returns:
        ``(answer, None)`` or ``(None, reason)`` for an unterminated think block or an empty answer.
    """
    end = text.rfind(THINK_CLOSE)
    if end >= 0:
        text = text[end + len(THINK_CLOSE):]
    elif thinking or THINK_OPEN in text:
        return None, "unterminated thinking: no '</think>' after the reasoning; raise max_new_tokens"
    if not text.strip():
        return None, "empty answer: nothing to parse" + (" after '</think>'" if end >= 0 else "")
    return text, None


def _fail(reason: str, fields: tuple[str, ...] = ()) -> ParsedAnswer:
    return ParsedAnswer(math.nan, {key: math.nan for key in fields}, reason, {"parsed_ok": False})


def parse_ur2(text: str, *, thinking: bool = False, require_all: bool = True) -> ParsedAnswer:
    """Read ``Alignment / Coherence / Style Score (1-5): x`` (first match each, ``*`` removed, any case).

    ``score`` is the mean of the three on the 1-5 scale (no clipping). A missing dimension makes the row NaN
    (``require_all=True``) or, as DiffSynth, the mean of the ones found with a ``"partial"`` note.
    """
    answer, reason = answer_text(text, thinking=thinking)
    if answer is None:
        return _fail(reason, UR2_FIELDS)
    answer = answer.replace("*", "")
    fields = {}
    for key, label in _UR2_LABELS:
        match = re.search(re.escape(label) + r"\s*(?:\([^)]+\))?\s*:\s*(" + _NUMBER + ")", answer, re.I)
        fields[key] = float(match.group(1)) if match else math.nan
    found = [v for v in fields.values() if not math.isnan(v)]
    missing = ", ".join(k for k, v in fields.items() if math.isnan(v))
    if not found:
        return _fail("no scores: expected lines like 'Alignment Score (1-5): X'", UR2_FIELDS)
    if missing and require_all:
        return ParsedAnswer(math.nan, fields, f"missing dimensions: {missing}", {"parsed_ok": False})
    return ParsedAnswer(sum(found) / len(found), fields, f"partial: no {missing}" if missing else None,
                        {"parsed_ok": True})


def _loads(span: str) -> Any:
    """``json.loads`` of a JSON-ish span; also tries trailing commas removed and ``'`` as ``"``."""
    no_trailing = re.sub(r",\s*([}\]])", r"\1", span)
    for candidate in (span, no_trailing, span.replace("'", '"'), no_trailing.replace("'", '"')):
        try:
            return json.loads(candidate)
        except ValueError:
            continue
    return None


def _as_number(value: Any) -> float | None:
    """A finite JSON number or numeric string as float, else ``None`` (booleans and NaN are not numbers)."""
    if isinstance(value, str) and re.fullmatch(_NUMBER, value.strip()):
        return float(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _score_list(answer: str) -> tuple[list[float] | None, str | None]:
    """The numbers of ``"score": [a, b, ...]`` (JSON block first, then a regex) and the JSON ``reasoning``."""
    block = re.search(r"\{.*\}", answer, re.S)
    parsed = _loads(block.group(0)) if block else None
    if isinstance(parsed, dict) and isinstance(parsed.get("score"), list):
        items = [_as_number(v) for v in parsed["score"]]
        if all(v is not None for v in items):
            reasoning = parsed.get("reasoning")
            return items, reasoning if isinstance(reasoning, str) else None
    match = re.search(r'"?score"?\s*[:=]\s*\[([^\]]+)\]', answer, re.I)  # DiffSynth: ':' only
    return ([float(v) for v in re.findall(_NUMBER, match.group(1))] if match else None), None


def parse_edit_pointwise(text: str, *, thinking: bool = False) -> ParsedAnswer:
    """``score: [editing_success, overediting]`` (each 0-25) -> their mean; exactly two numbers required."""
    names = ("editing_success", "overediting")
    answer, reason = answer_text(text, thinking=thinking)
    if answer is None:
        return _fail(reason, names)
    values, reasoning = _score_list(answer)
    if values is None:
        return _fail("no score list: expected '\"score\" : [score1, score2]'", names)
    if len(values) != 2:
        return _fail(f"wrong score count: expected 2 numbers in the score list, got {len(values)}", names)
    return ParsedAnswer(sum(values) / 2, dict(zip(names, values)), None, {"parsed_ok": True, "reasoning": reasoning})


_IMAGE = r"(?:(?:edited\s+)?image\s*#?\s*([12])\b|(first|second)\s+(?:edited\s+)?image)"
_ADVERBS = r"(?:(?:the|a|slightly|clearly|much|far|significantly|overall|definitely|somewhat)\s+)*"
_RANK_PATTERNS = (  # (regex, verdict): verdict "subject" = the matched image wins, "loser" = the other one wins
    (re.compile(_IMAGE + r"[\s*:)]*(?:(?:is|was|seems|appears|looks)\s+)?(?:to\s+be\s+)?" + _ADVERBS
                + r"(?:better|best|preferred|superior|winner|wins)\b", re.I), "subject"),
    (re.compile(_IMAGE + r"[\s*:)]*(?:is|was|seems|appears|looks)\s+" + _ADVERBS + r"(?:worse|inferior)\b", re.I),
     "loser"),
    (re.compile(r"\b(?:better|best|preferred|superior|winner|winning|answer|output|verdict|choice)"
                r"(?:\s+(?:edited\s+)?(?:image|one|edit|choice))?"
                r"[\s*]*(?:is|:|=)[\s*]*(?:the\s+)?" + _IMAGE, re.I), "subject"),
    (re.compile(r"\A\W*" + _IMAGE + r"\W*\Z", re.I), "subject"),  # the whole answer names one image
    (re.compile(r"\bboth\s+(?:edited\s+)?images?\s+(?:are\s+)?(?:equally\s+good|equal|tied?)\b|\btie\b"
                r"|\bneither\s+(?:edited\s+)?image\s+is\s+better\b", re.I), "tie"),
)
_DIFFSYNTH_RANK = (  # diffsynth/models/unified_reward_edit.py _parse_rank, tried in order (first hit wins)
    (re.compile(r"both images? (are )?(equally good|equal|tie)", re.I | re.S), 0),
    (re.compile(r"((edited )?image\s*1|first image).{0,24}\b(better|best|wins?|preferred|superior)\b", re.I | re.S), 1),
    (re.compile(r"((edited )?image\s*2|second image).{0,24}\b(better|best|wins?|preferred|superior)\b", re.I | re.S), 2),
)
_RANK_SCORE = {1: 1.0, 2: 0.0, 0: 0.5}  # image 1 (the scored images) wins / image 2 (other=) wins / tie


def _rank_winner(answer: str) -> int | None:
    """The verdict stated last in ``answer``: 1, 2, 0 (tie) or ``None``."""
    verdicts = []
    for pattern, kind in _RANK_PATTERNS:
        for match in pattern.finditer(answer):
            if kind == "tie":
                verdicts.append((match.start(), 0))
                continue
            number, ordinal = match.group(1), match.group(2)
            image = int(number) if number else (1 if ordinal.lower() == "first" else 2)
            verdicts.append((match.start(), image if kind == "subject" else 3 - image))
    return max(verdicts)[1] if verdicts else None


def parse_edit_rank(text: str, *, thinking: bool = False, rank_parser: str = "fixed") -> ParsedAnswer:
    """Which edited image wins: ``score`` 1.0 (image 1), 0.0 (image 2), 0.5 (tie); ``extra["winner"]`` 1 / 2 / 0.

    ``rank_parser="fixed"`` takes the last stated verdict ("Image 2 is better", "The better image is Image 1",
    a bare "Edited Image 2", a tie); ``"diffsynth"`` reproduces DiffSynth's first-match regexes.
    """
    answer, reason = answer_text(text, thinking=thinking)
    if answer is None:
        return _fail(reason)
    if _choose(rank_parser, RANK_PARSERS, "rank_parser") == "diffsynth":
        winner = next((value for pattern, value in _DIFFSYNTH_RANK if pattern.search(answer)), None)
    else:
        winner = _rank_winner(answer)
    if winner is None:
        return _fail("no verdict: expected a sentence like 'Edited Image 1 is better'")
    return ParsedAnswer(_RANK_SCORE[winner], {}, None, {"parsed_ok": True, "winner": winner})


_PAIR_FALLBACKS = (  # diffsynth/models/unified_reward_edit.py, tried after the score list
    re.compile(r"Image\s*1[^-+\d]*(" + _NUMBER + r").*?Image\s*2[^-+\d]*(" + _NUMBER + ")", re.I | re.S),
    re.compile(r"score(?:s)?[^-+\d]*(" + _NUMBER + r")[^\n\r\-+\d]+(" + _NUMBER + ")", re.I),
)


def parse_edit_pairwise_score(text: str, *, thinking: bool = False) -> ParsedAnswer:
    """Two open-scale scores ``[s1, s2]`` (score list, else "Image 1 ... s1 ... Image 2 ... s2") -> ``s1 - s2``."""
    names = ("image_1_score", "image_2_score")
    answer, reason = answer_text(text, thinking=thinking)
    if answer is None:
        return _fail(reason, names)
    values, _ = _score_list(answer)
    if values is not None and len(values) != 2:
        return _fail(f"wrong score count: expected 2 numbers in the score list, got {len(values)}", names)
    if values is None:
        match = next((m for m in (p.search(answer) for p in _PAIR_FALLBACKS) if m), None)
        if match is None:
            return _fail("no scores: expected 'score: [s1, s2]' or 'Image 1: s1 ... Image 2: s2'", names)
        values = [float(match.group(1)), float(match.group(2))]
    return ParsedAnswer(values[0] - values[1], dict(zip(names, values)), None, {"parsed_ok": True})
