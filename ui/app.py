"""qsearch's search UI. Start it with `qsearch ui INDEX` (or `streamlit run ui/app.py -- --index INDEX`).

Every search goes through the engine's Python API (`search.engine.Searcher`); `ui.core` holds the
non-Streamlit logic. Images are read only by image id of the open index, never by a path from a request.
URL parameters: `?q=<text>` starts a text search, `?like=<image id>` a "more like this" search.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import streamlit as st

from indexer import IndexCorrupt, IndexNotFound, IndexStoreError, ModelMismatch
from indexer.store import read_current
from qformer.malloc import keep_freed_memory
from search.engine import Searcher
from ui import core

INDEX_ENV = "QSEARCH_INDEX"  # the index directory, when not given as `-- --index DIR`
COLUMNS = 4  # thumbnails per row
MAX_URL_QUERY = 2000  # characters of ?q= passed on (the engine rejects longer queries with a message)


def index_dir_from_args(argv: list[str]) -> str:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--index", default=os.environ.get(INDEX_ENV, ""))
    return p.parse_known_args(argv)[0].index


@st.cache_resource(show_spinner="Opening the index and loading its model…", max_entries=2)
def load_searcher(index_dir: str, generation: str) -> Searcher:
    """The engine over one generation of the index (a rebuilt index has a new generation: reloaded)."""
    return Searcher(index_dir)


@st.cache_data(show_spinner=False, max_entries=4096)
def thumbnail(index_dir: str, generation: str, image_id: int) -> bytes:
    """Thumbnail JPEG of an indexed image, cached across reruns and sessions."""
    searcher = load_searcher(index_dir, generation)
    try:
        return core.thumbnail_bytes(searcher.index, image_id)
    except (OSError, ValueError):  # the file went away or changed since indexing
        return core.placeholder_thumbnail()


@st.cache_data(show_spinner=False, max_entries=64)
def run_search(index_dir: str, generation: str, text: str, upload: bytes | None, like: int | None, k: int,
               offset: int, rerank: int, expand: bool, hybrid: bool, where: str,
               params: tuple[Any, ...]) -> list[dict[str, Any]]:
    """One page of results, as plain dicts (cached: paging back and forth does not search again).

    expand: an image query's generated caption joins it as text. hybrid: the text's candidates fuse BM25 over
    the stored captions with the dense ranking. The engine applies each where it means something."""
    searcher = load_searcher(index_dir, generation)
    image = None
    if upload is not None:
        image = core.read_upload(upload)
    elif like is not None:
        image = core.read_indexed_image(searcher.index, like)
    text = text.strip() or None
    hits = searcher.search(text=text, image=image, k=k, offset=offset, rerank=rerank, where=where or None,
                           params=list(params), expand=expand, hybrid=hybrid)
    return [asdict(h) for h in hits]


@st.cache_data(show_spinner="Captioning…", max_entries=1024)
def caption_of(index_dir: str, generation: str, image_id: int) -> str:
    from qformer.itg_decoder import caption_images

    searcher = load_searcher(index_dir, generation)
    return caption_images(searcher.model, [core.read_indexed_image(searcher.index, image_id)])[0]


# ---- state helpers (widget callbacks) -------------------------------------------------------------------
def _more_like(image_id: int) -> None:
    st.session_state["like"] = image_id
    st.session_state["q"] = ""
    st.session_state["page"] = 1


def _clear_like() -> None:
    st.session_state["like"] = None
    st.session_state["page"] = 1


def _want_caption(image_id: int) -> None:
    st.session_state.setdefault("captions_wanted", set()).add(image_id)


def _turn_page(delta: int) -> None:
    st.session_state["page"] = max(1, st.session_state.get("page", 1) + delta)


# ---- pages ---------------------------------------------------------------------------------------------------
def index_page(searcher: Searcher) -> None:
    s = core.index_summary(searcher.index)
    a, b, c = st.columns(3)
    a.metric("Images", f"{s['images']:,}")
    b.metric("Skipped files", len(s["skipped"]))
    c.metric("Build time", f"{s['build_seconds']:.1f} s")
    st.markdown(f"**Model** `{s['model']}` ({s['model_source']}) · **Vectors** {s['vectors']}")
    st.markdown(f"**Built** {s['created']} · **Last updated** {s['updated']} · **Folder** `{s['index_dir']}`")
    if not s["complete"]:
        st.warning("The last indexing run did not finish: run `qsearch index` again to complete it.")
    if s["skipped"]:
        st.subheader("Skipped files")
        st.dataframe(s["skipped"], hide_index=True)


def sidebar_controls(searcher: Searcher) -> dict[str, Any]:
    sb = st.sidebar
    sb.header("Options")
    rerank_on = sb.toggle("Re-rank with ITM", value=True, key="rerank_on",
                          help="Re-score the best ITC candidates with the ITM head (score = ITM logit + ITC).")
    depth = sb.select_slider("Re-rank depth", options=[16, 32, 64, 128, 256], value=128, key="depth",
                             disabled=not rerank_on, help="How many ITC candidates ITM re-scores.")
    expand = sb.toggle("Caption expansion", value=False, key="expand",
                       help="Image queries: the example image's generated caption joins the query as text.")
    hybrid = sb.toggle("Hybrid text search", value=False, key="hybrid",
                       help="Text queries: BM25 over the stored captions is fused with the dense ITC ranking "
                            "before re-ranking.")
    per_page = sb.selectbox("Results per page", core.PAGE_SIZES, index=0, key="per_page")
    sb.header("Filters")
    filters = core.column_filters(searcher.index.metadata)
    chosen: dict[str, Any] = {}
    for f in filters:
        key = f"filter_{f.column}"
        if f.kind == "choice":
            chosen[f.column] = sb.multiselect(f.column, f.options, key=key)
        elif f.kind == "range":
            is_int = isinstance(f.low, int) and isinstance(f.high, int)
            lo, hi = (int(f.low), int(f.high)) if is_int else (float(f.low), float(f.high))
            chosen[f.column] = sb.slider(f.column, min_value=lo, max_value=hi, value=(lo, hi), key=key)
        elif f.kind == "date":
            picked = sb.date_input(f.column, value=(f.low, f.high), min_value=f.low, max_value=f.high, key=key)
            chosen[f.column] = tuple(picked) if isinstance(picked, (tuple, list)) and len(picked) == 2 else None
    free = sb.text_input("SQL WHERE", key="where", placeholder="width > 400 AND format = 'JPEG'",
                         help="A DuckDB predicate over the metadata columns, ANDed with the filters above.")
    where, params = core.where_clause(filters, chosen, free)
    return {"rerank": depth if rerank_on else 0, "expand": expand, "hybrid": hybrid, "per_page": per_page,
            "where": where, "params": tuple(params)}


def result_card(hit: dict[str, Any], index_dir: str, generation: str) -> None:
    st.image(thumbnail(index_dir, generation, hit["image_id"]), width="stretch")
    st.markdown(f"**#{hit['rank']}** · {core.score_line(hit)}")
    caption = hit["caption"]
    if hit["image_id"] in st.session_state.get("captions_wanted", set()):
        caption = caption_of(index_dir, generation, hit["image_id"])
    st.markdown(f"_{caption}_" if caption else "_no caption stored_")
    st.caption(hit["path"])
    a, b = st.columns(2)
    a.button("More like this", key=f"like_{hit['image_id']}", on_click=_more_like, args=(hit["image_id"],))
    b.button("Caption", key=f"cap_{hit['image_id']}", on_click=_want_caption, args=(hit["image_id"],))


def search_page(searcher: Searcher, index_dir: str, generation: str) -> None:
    if len(searcher.index) == 0:
        st.warning("This index is empty: add images with `qsearch index INDEX PHOTOS…`, then reload.")
        return
    opts = sidebar_controls(searcher)
    text = st.text_input("Search", key="q", placeholder="a dog running on the beach")
    upload = st.file_uploader("…or search by example image (with text: a combined query)", key="upload")
    upload_bytes = upload.getvalue() if upload is not None else None
    like = st.session_state.get("like")
    if like is not None and upload_bytes is None:
        try:
            like_path = core.indexed_path(searcher.index, like)
        except core.NotIndexed as e:
            st.error(f"“More like this” needs an image of this index: {e}")
            st.session_state["like"] = like = None
        else:
            c1, c2 = st.columns([5, 1])
            c1.info(f"Images like {like_path}")
            c2.button("Clear", key="clear_like", on_click=_clear_like)
    if not text.strip() and upload_bytes is None and like is None:
        st.caption("Type a query, upload an image, or open a result's “More like this”.")
        return

    signature = (text, hashlib.sha256(upload_bytes).hexdigest() if upload_bytes else None, like,
                 opts["rerank"], opts["expand"], opts["hybrid"], opts["where"], opts["params"], opts["per_page"])
    if st.session_state.get("signature") != signature:  # a new query starts at page 1
        st.session_state["signature"] = signature
        st.session_state["page"] = 1
    page = st.session_state.get("page", 1)
    try:
        hits = run_search(index_dir, generation, text, upload_bytes, None if upload_bytes else like,
                          opts["per_page"], core.page_offset(page, opts["per_page"]), opts["rerank"],
                          opts["expand"], opts["hybrid"], opts["where"], opts["params"])
    except ValueError as e:  # QueryError (empty/long query, bad filter, unreadable image) or a bad upload
        st.error(str(e))
        return
    except core.NotIndexed as e:
        st.error(str(e))
        return
    if not hits:
        st.info("No results" + (" on this page." if page > 1 else ": no image matches the filters."))
    else:
        st.markdown(f"Results {hits[0]['rank']}–{hits[-1]['rank']}")
        cols = st.columns(COLUMNS)
        for n, hit in enumerate(hits):
            with cols[n % COLUMNS]:
                result_card(hit, index_dir, generation)
    prev, label, nxt = st.columns([1, 2, 1])
    prev.button("← Previous", key="prev", disabled=page <= 1, on_click=_turn_page, args=(-1,))
    label.markdown(f"Page {page}")
    nxt.button("Next →", key="next", disabled=len(hits) < opts["per_page"], on_click=_turn_page, args=(1,))


def main() -> None:
    keep_freed_memory()  # the re-ranker reuses freed activations instead of faulting fresh pages in
    st.set_page_config(page_title="qsearch", layout="wide")
    st.title("qsearch")
    index_dir = index_dir_from_args(sys.argv[1:])
    if not index_dir:
        st.error("No index given. Start the UI with `qsearch ui INDEX`.")
        st.stop()
    for key, default in (("like", None), ("page", 1)):
        st.session_state.setdefault(key, default)
    if "url_read" not in st.session_state:  # ?q=…&like=… on first load
        st.session_state["url_read"] = True
        if st.query_params.get("q"):
            st.session_state["q"] = st.query_params["q"][:MAX_URL_QUERY]
        if st.query_params.get("like"):
            st.session_state["like"] = st.query_params["like"]  # validated against the index below
    try:
        generation = read_current(Path(index_dir))
        searcher = load_searcher(index_dir, generation)
    except IndexNotFound:
        st.error(f"No index at `{index_dir}`. Build one with `qsearch index {index_dir} PHOTOS…`.")
        st.stop()
    except (IndexCorrupt, IndexStoreError, ModelMismatch, OSError, ValueError) as e:
        st.error(f"Cannot open the index at `{index_dir}`: {e}")
        st.stop()
    search_tab, index_tab = st.tabs(["Search", "Index"])
    with index_tab:
        index_page(searcher)
    with search_tab:
        search_page(searcher, index_dir, generation)


main()
