"""metal-defect: check steel surface images with a trained model (Streamlit page).

A thin layer over `metal_defect.serving.predictor`: upload, ask the predictor, draw the
answer. No image conversion or model code lives here.

    streamlit run st_app_predict.py        # the served model of this checkout
    python main.py app [--port 8501]       # the same, on 0.0.0.0:$PORT (containers, Render)
    METAL_DEFECT_BUNDLE=/app/model_bundle  # serve an exported bundle instead (read-only is fine)
"""

from __future__ import annotations

import dataclasses
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
from metal_defect.review import NOT_VALID, ReviewStore, review_disabled
from metal_defect.serving import bundle as bundles
from metal_defect.serving.predictor import OUT_OF_DISTRIBUTION, PREDICTIONS_LOG, UNCERTAIN, Answer, Predictor, append_log, columns

UPLOAD_TYPES = ["bmp", "jpg", "jpeg", "png", "tif", "tiff"]
LOG_ENV = "METAL_DEFECT_PREDICTIONS_LOG"  # where the app appends answers when there is no artifacts folder
REVIEW_DIR_ENV = "METAL_DEFECT_REVIEW_DIR"  # the review store when there is no configuration
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


def app_config() -> Any:
    """The configuration the app runs with, or None (a container serving only a bundle)."""
    from metal_defect.config import load_config

    try:
        return load_config()
    except MetalDefectError:
        return None


def review_store() -> ReviewStore:
    """The review queue (paths.review with its cap; without a configuration, $METAL_DEFECT_REVIEW_DIR or ./review)."""
    config = app_config()
    if config is None:
        return ReviewStore(Path(os.environ.get(REVIEW_DIR_ENV, "review")))
    return ReviewStore(config.paths.review_root, config.review.max_items, config.review.max_mb)


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
        config = app_config()
        append_log(log_path(store), [answer], source="app", **({"rotate_mb": config.review.log_rotate_mb} if config else {}))
        if answer.flagged and not review_disabled():
            queued, message = review_store().add(data, upload.name, dataclasses.asdict(answer), why=answer.verdict, source="app")
            if not queued and "already" not in message:
                log.warning("review queue: %s", message)
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
    dispute(predictor, upload, answer)


def dispute(predictor: Predictor, upload: Any, answer: Answer) -> None:
    """"This answer is wrong": the image goes to the review queue with the class the user gives."""
    with st.popover("This answer is wrong"):
        others = [c for c in predictor.class_names if c != answer.label]
        true_class = st.selectbox("What is it?", others, key=f"dispute-class-{answer.sha256}")
        if st.button("Put it in the review queue", key=f"dispute-{answer.sha256}"):
            queued, message = review_store().add(upload.getvalue(), upload.name, dataclasses.asdict(answer), why="disputed",
                                                 source="app", user_class=true_class)
            (st.success if queued else st.warning)(as_text(message))


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


def review_page() -> None:
    """The queue, one image at a time: the engineer picks the true class, 'not a valid image', or skips."""
    st.set_page_config(page_title="metal-defect: review", page_icon=":material/rate_review:", layout="wide")
    st.title("Review")
    reviewer = st.sidebar.text_input("Reviewer", key="reviewer", help="stored with every decision ('anonymous' when empty)")
    st.session_state["reviewer_name"] = reviewer
    store = review_store()
    items = store.items()
    pending = [i for i in items if i.decision is None]
    st.caption(f"{len(pending)} of {len(items)} queued images not reviewed yet · store {store.root}")
    verdicts = sorted({i.why for i in pending})
    runs = sorted({i.model_run or "-" for i in pending})
    left, middle, right = st.columns(3)
    chosen_verdicts = left.multiselect("Verdict", verdicts, default=verdicts)
    chosen_run = middle.selectbox("Model run", ["all", *runs])
    order = right.radio("Order", ["newest first", "least confident first"], horizontal=True)
    skipped = st.session_state.setdefault("review_skipped", set())
    shown = [i for i in pending if i.why in chosen_verdicts and chosen_run in ("all", i.model_run or "-") and i.sha256 not in skipped]
    shown.sort(key=(lambda i: i.time) if order == "newest first" else (lambda i: -(i.confidence if i.confidence is not None else 1.0)),
               reverse=True)
    with st.container(key="review-item"):  # one place in the page, so the history below never shows twice while it reruns
        if shown:
            review_item(store, shown[0], reviewer, len(shown))
        else:
            st.success("Nothing left to review with these filters." + (" (Skipped ones come back on a new session.)" if skipped else ""))
    history_section()


def review_item(store: ReviewStore, item: Any, reviewer: str, remaining: int) -> None:
    """One queued image with the model's answer, and a button per decision; the next item follows at once."""
    st.subheader(f"{as_text(item.name)} ({remaining} to go)")
    answer = (f"the model said **{item.label}** at {item.confidence:.1%}" if item.confidence is not None else "no answer") + f", verdict *{item.why}*"
    if item.user_class:
        answer += f"; a user says it is **{item.user_class}**"
    st.markdown(answer + f" · run `{item.model_run or '-'}` · {item.time}")
    left, right = st.columns(2)
    path = store.image_path(item)
    data = path.read_bytes() if path.is_file() else b""
    predictor = review_predictor()
    if data and predictor is not None:
        with work_slot():
            left.image(png_bytes(predictor.display_image(data, DISPLAY_SIDE)), caption=item.name, width="stretch")
            if item.label in predictor.class_names:
                answered = predictor.answer_file(data, item.name)
                right.image(png_bytes(predictor.explain(data, answered, max_side=DISPLAY_SIDE)[1]),
                            caption=f"where it looked for '{answered.label}' (heatmap)", width="stretch")
    elif not data:
        left.warning("The image file is missing from the review store.")
    if item.probabilities:
        right.bar_chart({"probability": dict(item.probabilities)}, horizontal=True, height=40 + 28 * len(item.probabilities))
    classes = list(item.probabilities) or ([item.label] if item.label else [])
    buttons = st.columns(len(classes) + 2)
    for column, label in zip(buttons, classes):
        if column.button(label, key=f"label-{label}", type="primary" if label == item.label else "secondary"):
            decide(store, item, label, classes, reviewer)
    if buttons[-2].button("Not a valid image", key="label-not-valid"):
        decide(store, item, NOT_VALID, classes, reviewer)
    if buttons[-1].button("Skip", key="skip"):
        st.session_state["review_skipped"].add(item.sha256)
        st.rerun()


def decide(store: ReviewStore, item: Any, label: str, classes: list[str], reviewer: str) -> None:
    try:
        store.label(item.sha256, label, classes, reviewer)
    except MetalDefectError as exc:
        st.error(as_text(str(exc)))
        return
    st.toast(f"{item.name}: {label}")
    st.rerun()


def review_predictor() -> Predictor | None:
    """The first model the answer page would use, for the images and heatmaps of the Review page (None: none)."""
    choices = model_choices(artifact_store())
    for bundle in choices.values():
        try:
            return load_predictor(str(bundle))
        except MetalDefectError:
            continue
    return None


def history_section() -> None:
    """Answers per day by verdict, and the flagged share, from the predictions log (the last HISTORY_DAYS days)."""
    from metal_defect.history import HISTORY_DAYS, daily_verdicts

    st.header("History")
    frame = daily_verdicts(log_path(artifact_store()), HISTORY_DAYS)
    if frame.empty:
        st.caption("No answers logged yet.")
        return
    counts = frame.drop(columns=["flagged_share"])
    st.caption(f"answers per day by verdict, last {HISTORY_DAYS} days; flagged share (uncertain + out of distribution) below")
    st.bar_chart(counts, height=220)
    st.line_chart(frame[["flagged_share"]], height=160)


def answer_page() -> None:
    """The answer page, with any unexpected failure as one line for the visitor and the detail in the server's log."""
    guarded(main)


def guarded_review_page() -> None:
    guarded(review_page)


def guarded(page: Any) -> None:
    try:
        page()
    except Exception:
        log.exception("the page failed")
        st.error("Something went wrong on the server while answering; the operator's log has the detail.")


def run_page() -> None:
    """Two pages: the answers (default) and the review queue (its navigation entry is named "Review")."""
    st.navigation([st.Page(answer_page, title="Check images", icon=":material/search:", default=True),
                   st.Page(guarded_review_page, title="Review", icon=":material/rate_review:", url_path="review")]).run()


run_page()
