"""metal-defect: check steel surface images with a trained model (Streamlit page).

A thin layer over `metal_defect.serving.predictor`: upload, ask the predictor, draw the
answer. No image conversion or model code lives here.

    streamlit run st_app_predict.py        # the served model of this checkout
    python main.py app [--port 8501]       # the same, on 0.0.0.0:$PORT (containers, Render)
    METAL_DEFECT_BUNDLE=/app/model_bundle  # serve an exported bundle instead (read-only is fine)
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import threading
from pathlib import Path
from typing import Any

import streamlit as st

from metal_defect import served as served_model
from metal_defect.errors import MetalDefectError
from metal_defect.serving import bundle as bundles
from metal_defect.serving.predictor import OUT_OF_DISTRIBUTION, PREDICTIONS_LOG, UNCERTAIN, Answer, Predictor, append_log, columns

UPLOAD_TYPES = ["bmp", "jpg", "jpeg", "png", "tif", "tiff"]
LOG_ENV = "METAL_DEFECT_PREDICTIONS_LOG"  # where the app appends answers when there is no artifacts folder
# A web user may load a bundle from a folder they type only when the operator allows it: otherwise
# the app serves the artifacts folder's runs and $METAL_DEFECT_BUNDLE, nothing else on the disk.
TYPED_BUNDLES_ENV = "METAL_DEFECT_ALLOW_BUNDLE_PATHS"
# What the page does per upload and per session: images are shown (and heatmaps drawn) with this
# long side, at most this many files are answered per upload, and per session.
DISPLAY_SIDE = 800
MAX_FILES_PER_UPLOAD = 100
MAX_FILES_PER_SESSION = 1000
log = logging.getLogger("metal_defect.app")


@st.cache_resource
def work_slot() -> threading.Semaphore:
    """One image is decoded and worked at a time in this server process, whatever the number of
    sessions: memory stays at one image's decode above the model (Streamlit runs sessions in threads)."""
    return threading.Semaphore(1)


def typed_bundles_allowed() -> bool:
    """Has the operator allowed web users to type a bundle folder ($METAL_DEFECT_ALLOW_BUNDLE_PATHS)?"""
    return os.environ.get(TYPED_BUNDLES_ENV, "").lower() in ("1", "true", "yes")


def as_text(name: str) -> str:
    """A file name for Markdown, shown as typed: every Markdown character escaped (no links, images or emphasis)."""
    return re.sub(r"([\\`*_{}\[\]()<>#!|~:$])", r"\\\1", name)


@st.cache_resource(show_spinner="Loading the model…", max_entries=2)
def load_predictor(bundle: str) -> Predictor:
    """One predictor per bundle folder, loaded once per server process."""
    return Predictor.from_bundle(Path(bundle))


def artifact_store() -> Any:
    """The checkout's artifacts folder, or None (a container serving only a bundle)."""
    from metal_defect.artifacts import ArtifactStore
    from metal_defect.config import load_config

    try:
        return ArtifactStore(load_config().paths.artifacts)
    except MetalDefectError:
        return None


def model_choices(store: Any) -> dict[str, Path]:
    """Label -> bundle folder: $METAL_DEFECT_BUNDLE, the served model, then every evaluated run."""
    choices: dict[str, Path] = {}
    env = os.environ.get(bundles.BUNDLE_ENV)
    if env and (Path(env) / bundles.SERVING_SPEC).is_file():
        choices[f"bundle {env}"] = Path(env)
    if store is not None:
        try:
            bundle, served = served_model.served_bundle(store)
            choices[f"served: run {served['run_id']}"] = bundle
        except (MetalDefectError, KeyError, TypeError) as exc:  # no pointer yet, or a broken one: the other bundles still serve
            if served_model.pointer_path(store).exists():
                log.warning("the served pointer cannot be used: %s", exc)
                st.sidebar.warning("The served model's pointer cannot be read; the operator's log says why.")
        for run_id, bundle in served_model.chosen_runs(store):
            if all(bundle.resolve() != b.resolve() for b in choices.values()):
                choices[f"run {run_id}"] = bundle
    return choices


def empty_state() -> None:
    st.title("metal-defect")
    st.info("No trained model yet. Train one with `python main.py` (it serves the best model when it finishes), "
            "or point the app at an exported bundle: `python main.py export model_bundle`, then start the app with "
            f"`{bundles.BUNDLE_ENV}=model_bundle` (in Docker: mount it at `/app/model_bundle`)"
            + (", or give a bundle folder in the sidebar." if typed_bundles_allowed() else "."))


def sidebar(store: Any) -> tuple[Predictor | None, float, bool]:
    """Model choice and facts, threshold slider, heatmap toggle."""
    st.sidebar.header("Model")
    choices = model_choices(store)
    options = [*choices, *(["a bundle folder…"] if typed_bundles_allowed() else [])]
    if not options:
        return None, 0.0, False
    choice = st.sidebar.selectbox("Model in use", options, index=0, help="the served model first, then every evaluated run")
    if choice == "a bundle folder…":
        folder = st.sidebar.text_input("Bundle folder (with serving.json)")
        if not folder:
            return None, 0.0, False
        bundle = Path(folder)
    else:
        bundle = choices[choice]
    try:
        predictor = load_predictor(str(bundle))
    except MetalDefectError as exc:
        log.error("cannot load the bundle %s: %s", bundle, exc)
        st.sidebar.error("This model cannot be loaded (its files are missing or were changed); the operator's log says why.")
        return None, 0.0, False
    spec = predictor.spec
    metrics = bundles.read_metrics(bundle)
    test = metrics.get("test") or {}
    lines = [f"**{spec.model_name}**, run `{spec.run_id or '-'}`", f"weights: {'pretrained' if spec.pretrained else 'trained from scratch'}",
             f"input: {spec.image_size} px {spec.color_mode}; classes: {', '.join(spec.class_names)}"]
    if test:
        lo, hi = test["accuracy_ci95"]
        lines.append(f"test accuracy **{test['accuracy']:.1%}** (95% CI {lo:.1%}–{hi:.1%}, n={test['n']}), macro F1 {test['macro_f1']:.3f}")
    pointing = (metrics.get("pointing") or {}).get("overall")
    if pointing:
        lines.append(f"heatmap pointing accuracy {pointing['strict']:.1%} (chance {pointing['chance']:.1%}, n={pointing['n']})")
    st.sidebar.markdown("  \n".join(lines))
    run_dir = bundle.parent
    for picture, caption in ((run_dir / "test" / "confusion_matrix.png", "Confusion matrix (test)"),
                             (run_dir / "test" / "heatmaps.png", "Heatmaps on boxed test images")):
        if picture.is_file():
            st.sidebar.image(str(picture), caption=caption)
    card = bundle / bundles.MODEL_CARD
    if card.is_file():
        with st.sidebar.expander("Model card"):
            st.markdown(card.read_text(encoding="utf-8"))
    st.sidebar.header("Answers")
    threshold = st.sidebar.slider("Not sure below this confidence", 0.0, 1.0, float(predictor.threshold), 0.01,
                                  help=f"Default {predictor.threshold:.2f}: {spec.uncertain_rule}")
    show_heatmaps = st.sidebar.toggle("Show where the model looked (heatmap)", value=True)
    return predictor, threshold, show_heatmaps


def log_path(store: Any) -> Path:
    if store is not None:
        return store.root / PREDICTIONS_LOG
    return Path(os.environ.get(LOG_ENV, PREDICTIONS_LOG))


def answer_upload(predictor: Predictor, upload: Any, store: Any) -> Answer:
    """The answer for one uploaded file, computed once per file and model (and logged then)."""
    data = upload.getvalue()
    key = ("answer", hashlib.sha256(data).hexdigest(), upload.name, predictor.model_sha256)
    if key not in st.session_state:
        with work_slot():
            answer = predictor.answer_file(data, upload.name)
        append_log(log_path(store), [answer], source="app")
        st.session_state[key] = answer
    return st.session_state[key]


def shown_image(predictor: Predictor, upload: Any, answer: Answer) -> bytes:
    """The upload as the page shows it: 8-bit, long side DISPLAY_SIDE, PNG (a 16-bit TIFF or a 36 MP PNG too)."""
    key = ("shown", answer.sha256, DISPLAY_SIDE)
    if key not in st.session_state:
        with work_slot():
            picture = predictor.display_image(upload.getvalue(), DISPLAY_SIDE)
        st.session_state[key] = png_bytes(picture)
    return st.session_state[key]


def png_bytes(picture: Any) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def verdict_box(answer: Answer) -> None:
    """The verdict in colour, icon and words."""
    if answer.error:
        st.error(f"**{as_text(answer.path)}** could not be read: {as_text(answer.error)}", icon=":material/broken_image:")
    elif answer.verdict == OUT_OF_DISTRIBUTION:
        st.error(f"**Not like the training images** — {answer.reason}. Most likely *{answer.label}* "
                 f"({answer.confidence:.1%}), but do not trust this answer.", icon=":material/block:")
    elif answer.verdict == UNCERTAIN:
        st.warning(f"**Not sure** — most likely *{answer.label}* at {answer.confidence:.1%}, below the threshold "
                   f"{answer.threshold:.0%}. Have a person check it.", icon=":material/help:")
    else:
        st.success(f"**{answer.label}** — confidence {answer.confidence:.1%}", icon=":material/check_circle:")


def show_answer(predictor: Predictor, upload: Any, answer: Answer, show_heatmaps: bool) -> None:
    verdict_box(answer)
    if answer.error:
        return
    left, right = st.columns(2)
    left.image(shown_image(predictor, upload, answer), caption=upload.name, width="stretch")
    if show_heatmaps:
        key = ("heatmap", answer.sha256, predictor.model_sha256, answer.label)
        if key not in st.session_state:
            with work_slot():
                st.session_state[key] = png_bytes(predictor.explain(upload.getvalue(), answer, max_side=DISPLAY_SIDE)[1])
        right.image(st.session_state[key], caption=f"where it looked for '{answer.label}' (heatmap, ring = peak)",
                    width="stretch")
    st.bar_chart({"probability": answer.probabilities}, horizontal=True, height=40 + 28 * len(answer.probabilities))
    if answer.ood_score is not None:
        st.caption(f"OOD score {answer.ood_score:.2f} (above {predictor.spec.ood.threshold:g}: unlike the training images) · "
                   f"{answer.ms:.0f} ms")


def results_table(predictor: Predictor, answers: list[Answer]) -> None:
    import pandas as pd

    frame = pd.DataFrame([a.row(predictor.class_names) for a in answers], columns=columns(predictor.class_names))
    flagged_only = st.checkbox("Show only flagged images (not sure, not like the training images, unreadable)")
    shown = frame[frame["verdict"].isin([UNCERTAIN, OUT_OF_DISTRIBUTION]) | frame["error"].notna()] if flagged_only else frame
    st.dataframe(shown, hide_index=True, width="stretch")
    st.download_button("Download all answers (CSV)", frame.to_csv(index=False).encode(), "answers.csv", "text/csv")


def within_limits(uploads: list[Any]) -> list[Any]:
    """The uploads this page answers: at most MAX_FILES_PER_UPLOAD at once and MAX_FILES_PER_SESSION
    different files per session; the page says what it left out."""
    seen = st.session_state.setdefault("files_seen", set())
    kept = []
    for upload in uploads[:MAX_FILES_PER_UPLOAD]:
        key = (upload.name, upload.size)
        if key in seen or len(seen) < MAX_FILES_PER_SESSION:
            seen.add(key)
            kept.append(upload)
    if len(kept) < len(uploads):
        st.warning(f"{len(uploads) - len(kept)} of {len(uploads)} files are not answered: this page answers at most "
                   f"{MAX_FILES_PER_UPLOAD} files at once and {MAX_FILES_PER_SESSION} in one session (reload the page for a new one), "
                   "or use `python main.py predict FOLDER` for large batches.")
    return kept


def main() -> None:
    st.set_page_config(page_title="metal-defect", page_icon=":material/search:", layout="wide")
    store = artifact_store()
    predictor, threshold, show_heatmaps = sidebar(store)
    if predictor is None:
        empty_state()
        return
    spec = predictor.spec
    st.title("metal-defect")
    if spec.weak_model:
        st.error("**Weak model** — evaluation flagged this model; do not rely on its answers before the data is checked:\n\n"
                 + "\n".join(f"- {reason}" for reason in spec.weak_reasons), icon=":material/report:")
    uploads = st.file_uploader(f"Images of steel surfaces ({', '.join(UPLOAD_TYPES)}); one or many", type=UPLOAD_TYPES,
                               accept_multiple_files=True)
    if not uploads:
        st.caption(f"Answers come from {spec.model_name} (run {spec.run_id or '-'}): a class, '{UNCERTAIN}' below the "
                   f"confidence threshold, or '{OUT_OF_DISTRIBUTION}' for images unlike the training images.")
        return
    uploads = within_limits(uploads)
    answers = [predictor.judge(answer_upload(predictor, upload, store), threshold) for upload in uploads]
    if len(uploads) > 1:
        flagged = sum(a.flagged for a in answers)
        failed = sum(a.error is not None for a in answers)
        st.subheader(f"{len(answers)} images: {len(answers) - flagged - failed} answered, {flagged} flagged, {failed} unreadable")
        results_table(predictor, answers)
    for upload, answer in zip(uploads, answers):
        if len(uploads) > 1:
            with st.expander(f"{as_text(upload.name)}: {answer.verdict or 'unreadable'}", expanded=len(uploads) <= 5 or answer.flagged or answer.error is not None):
                show_answer(predictor, upload, answer, show_heatmaps)
        else:
            show_answer(predictor, upload, answer, show_heatmaps)


def run_page() -> None:
    """The page, with any unexpected failure as one line for the visitor and the detail in the server's log."""
    try:
        main()
    except Exception:
        log.exception("the page failed")
        st.error("Something went wrong on the server while answering; the operator's log has the detail.")


run_page()
