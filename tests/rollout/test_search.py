"""Offline BM25 search, the HTTP backend against a local server, image search, the registry."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import ImageEnhance

from deepeyesv2_rollout.tools import (HttpSearch, ImageIndex, ImageSearchTool, LocalBM25Search,
                                      SearchError, SearchHit, SearchTimeout, SearchTool, Session,
                                      ToolRegistry, ToolResult, default_registry, load_corpus)


@pytest.fixture(scope="module")
def bm25():
    return LocalBM25Search()


def test_corpus_shape_and_facts():
    docs = load_corpus()
    assert 100 <= len(docs) <= 200
    assert len({d["id"] for d in docs}) == len(docs) == len({d["title"] for d in docs})
    zorblax = next(d for d in docs if d["title"] == "Zorblax lighthouse")
    assert "painted teal and was built in 1887" in zorblax["text"]
    for d in docs:  # every fact a demo may ask about is stated in the text
        for value in d["facts"].values():
            assert str(value) in d["text"], (d["id"], value)


@pytest.mark.parametrize("query,title", [
    ("What color is the Zorblax lighthouse?", "Zorblax lighthouse"),
    ("When was the Zorblax lighthouse built", "Zorblax lighthouse"),
])
def test_bm25_known_queries(bm25, query, title):
    hits = bm25.search(query, 3)
    assert hits[0].title == title
    assert hits[0].score > hits[1].score > 0


def test_bm25_finds_every_entity_by_its_name(bm25):
    for doc in load_corpus()[::5]:
        name = doc["title"].replace(" (ship)", "")
        hits = bm25.search(f"tell me about {name}", 5)
        assert hits[0].title == doc["title"], (name, [h.title for h in hits])


def test_bm25_k_and_no_match(bm25):
    assert len(bm25.search("lighthouse", 4)) == 4
    assert bm25.search("qwxzjkv", 5) == []
    with pytest.raises(ValueError, match="non-empty"):
        bm25.search("   ", 5)


def test_search_tool_wraps_and_respects_k(bm25):
    r = SearchTool(bm25, k=2).call({"query": "Zorblax lighthouse"}, None)
    assert r.status == "ok" and r.error is None
    assert r.text.startswith("<tool_response>\n[1] Zorblax lighthouse\nThe Zorblax lighthouse is")
    assert r.text.endswith("\n</tool_response>")
    assert "[2] " in r.text and "[3] " not in r.text
    assert "URL: https://encyclopedia.invalid/wiki/Zorblax_lighthouse" in r.text


@pytest.mark.parametrize("args", [{}, {"query": ""}, {"query": "  "}, {"query": 3}])
def test_search_tool_bad_query_is_a_wrapped_error(bm25, args):
    r = SearchTool(bm25).call(args, None)
    assert r.status == "error" and "query" in r.error
    assert r.text == f"<tool_response>\nError: {r.error}\n</tool_response>"


def test_load_corpus_errors_name_the_line(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text('{"id": "a", "title": "t", "text": "x", "url": "u"}\n{"id": "b"}\n')
    with pytest.raises(ValueError, match=r"c\.jsonl:2: missing"):
        load_corpus(p)
    with pytest.raises(ValueError, match="not found"):
        load_corpus(tmp_path / "nope.jsonl")


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path == "/slow":
            time.sleep(1.5)
        if self.path == "/broken":
            self.send_response(500)
            self.end_headers()
            return
        results = [{"title": f"{body['query']} #{i}", "text": "t", "url": f"http://x/{i}",
                    "score": 1.0 / (i + 1)} for i in range(body["k"])]
        data = b"not json" if self.path == "/garbage" else json.dumps({"results": results}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture(scope="module")
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def test_http_search_round_trip(server):
    hits = HttpSearch(server + "/search", timeout=5).search("moon", 3)
    assert hits == [SearchHit(f"moon #{i}", "t", f"http://x/{i}", 1.0 / (i + 1)) for i in range(3)]
    r = SearchTool(HttpSearch(server + "/search"), k=2).call({"query": "moon"}, None)
    assert r.status == "ok" and "[1] moon #0" in r.text and "[2] moon #1" in r.text


def test_http_search_errors(server):
    with pytest.raises(SearchTimeout, match="did not answer within 0.3 s"):
        HttpSearch(server + "/slow", timeout=0.3).search("q", 1)
    with pytest.raises(SearchError, match="HTTP 500"):
        HttpSearch(server + "/broken").search("q", 1)
    with pytest.raises(SearchError, match="invalid JSON"):
        HttpSearch(server + "/garbage").search("q", 1)
    r = SearchTool(HttpSearch(server + "/slow", timeout=0.3)).call({"query": "q"}, None)
    assert r.status == "timeout" and r.text.startswith("<tool_response>\nError: ")
    port = server.rsplit(":", 1)[1]
    dead = HttpSearch(f"http://127.0.0.1:{int(port) + 1 if int(port) < 65535 else 1}/", timeout=1)
    r = SearchTool(dead).call({"query": "q"}, None)
    assert r.status in ("error", "timeout") and "search server" in r.error
    with pytest.raises(ValueError, match="http://"):
        HttpSearch("ftp://x")


def test_image_search_nearest_match(tmp_path):
    index = ImageIndex.synthetic(n=24)
    title, original = index.entries[7]
    query = ImageEnhance.Brightness(original.resize((300, 300))).enhance(1.1)
    hits = index.search(query, k=3)
    assert hits[0].title == title and hits[0].distance < hits[1].distance
    index.write(tmp_path)
    reread = ImageIndex.from_directory(tmp_path)
    assert [t for t, _ in reread.entries] == [t for t, _ in index.entries]
    tool = ImageSearchTool(reread, k=2)
    session = Session([original.rotate(0), query])
    r = tool.call({"image_index": 2}, session)
    assert r.status == "ok" and len(r.images) == 2
    assert r.text.startswith(f"<tool_response>\nImage search results for image_2:\n[1] {title} ")
    assert r.images[0].tobytes() == original.tobytes()
    assert tool.call({}, session).text.startswith("<tool_response>\nImage search results for image_1")
    assert tool.call({"image_index": 3}, session).status == "error"
    assert "1-based" in tool.call({"image_index": 0}, session).error
    assert tool.call({}, Session([])).error == "this episode has no input image to search with"


def test_default_registry_and_registry_errors():
    reg = default_registry()
    assert reg.names() == ["code", "search", "image_search"]
    r = reg.call("search", {"query": "Zorblax lighthouse color"}, Session([]))
    assert r.status == "ok" and "[1] Zorblax lighthouse" in r.text

    class Boom:
        name = "boom"

        def call(self, args, session):
            raise RuntimeError("kaput")

    with pytest.raises(ValueError, match="registered twice"):
        ToolRegistry([Boom(), Boom()])
    reg2 = ToolRegistry([Boom()])
    r = reg2.call("boom", {}, None)
    assert r.status == "error" and r.error == "tool 'boom' failed: RuntimeError: kaput"
    r = reg2.call("search", {}, None)
    assert r.error == "unknown tool 'search'; available tools: boom"
    assert isinstance(r, ToolResult) and r.text == f"Error: {r.error}"
