"""The Python sandbox as a notebook: state, images in and out, output capture, limits, the pool."""

import os
import threading

import pytest
from PIL import Image

from deepeyesv2_rollout.tools import (CodeTool, SandboxLimits, SandboxPool, Session,
                                      detect_isolation, format_code_result, isolation_report,
                                      strip_fence)

LIMITS = SandboxLimits(timeout_s=5.0, max_output_chars=8000)


@pytest.fixture(scope="module")
def pool():
    with SandboxPool(size=2, limits=LIMITS) as p:
        assert p.wait_warm(120), p.last_error
        yield p


def checker_image() -> Image.Image:
    """64x48 image: left half red, right half blue, one green pixel at (10, 5)."""
    im = Image.new("RGB", (64, 48), (255, 0, 0))
    im.paste((0, 0, 255), (32, 0, 64, 48))
    im.putpixel((10, 5), (0, 255, 0))
    return im


def test_format_code_result_is_exact():
    assert format_code_result("a\n", "b\n") == "Code execution result:\nstdout:\na\n\nstderr:\nb\n"


def test_state_persists_across_calls(pool):
    with Session([], pool=pool) as s:
        assert s.run_code("x = 41\ndef inc(v):\n    return v + 1").status == "ok"
        r = s.run_code("print(inc(x))")
        assert r.status == "ok", r.text
        assert r.text == format_code_result("42\n", "")


def test_last_expression_value_is_printed(pool):
    with Session([], pool=pool) as s:
        r = s.run_code("a = [1, 2]\na + [3]")
        assert r.text == format_code_result("[1, 2, 3]\n", "")


def test_image_1_preloaded_and_cropped_zoom_returned(pool):
    im = checker_image()
    with Session([im, im.rotate(90, expand=True)], pool=pool) as s:
        r = s.run_code("print(image_1.size, image_1.getpixel((10, 5)), image_2.size)")
        assert r.text == format_code_result("(64, 48) (0, 255, 0) (48, 64)\n", "")
        r = s.run_code("from PIL import Image\n"
                       "image_1.crop((8, 3, 40, 19)).resize((64, 32), Image.NEAREST)")
        assert r.status == "ok", r.text
        assert len(r.images) == 1
        expected = im.crop((8, 3, 40, 19)).resize((64, 32), Image.NEAREST)
        assert r.images[0].size == (64, 32)
        assert r.images[0].tobytes() == expected.tobytes()


def test_plt_show_returns_the_figure(pool):
    with Session([], pool=pool) as s:
        code = ("import matplotlib.pyplot as plt\n"
                "plt.figure(figsize=(2, 1), dpi=50)\nplt.plot([0, 1], [1, 0])\nplt.show()\n"
                "print('shown')")
        r = s.run_code(code)
        assert r.status == "ok", r.text
        assert [im.size for im in r.images] == [(100, 50)]
        assert "shown" in r.text
        # Closed after show: the next call returns nothing.
        assert s.run_code("1 + 1").images == []


def test_pil_last_expression_and_display_and_image_cap(pool):
    with Session([], pool=pool) as s:
        r = s.run_code("from PIL import Image\nImage.new('RGB', (7, 5), (1, 2, 3))")
        assert [im.size for im in r.images] == [(7, 5)]
        assert r.images[0].getpixel((3, 3)) == (1, 2, 3)
        r = s.run_code("for i in range(12):\n    display(Image.new('L', (i + 1, 2), i))")
        assert r.status == "ok"
        assert [im.size for im in r.images] == [(i + 1, 2) for i in range(10)]
        assert "[2 more images not returned: limit is 10 per call]" in r.text


def test_stdout_stderr_capture_and_truncation(pool):
    with Session([], pool=pool) as s:
        r = s.run_code("import sys\nprint('out')\nprint('err', file=sys.stderr)")
        assert r.text == format_code_result("out\n", "err\n")
        r = s.run_code("print('x' * 20000)")
        # 20000 chars + newline; the first 8000 are kept.
        assert r.text == format_code_result("x" * 8000 + "\n[... truncated 12001 chars]", "")


def test_exception_gives_one_line_error_and_keeps_state(pool):
    with Session([], pool=pool) as s:
        s.run_code("kept = 7")
        r = s.run_code("y = 1\n1 / 0")
        assert r.status == "error"
        assert r.error == "ZeroDivisionError: division by zero"
        assert 'File "<cell 2>", line 2' in r.text
        assert "_sandbox_worker" not in r.text  # the kernel's own frames are hidden
        assert s.run_code("print(kept, y)").text == format_code_result("7 1\n", "")
        r = s.run_code("def f(:\n  pass")
        assert r.status == "error" and r.error.startswith("SyntaxError: ")
        assert "(line 1)" in r.error


def test_timeout_kills_and_restarts_with_clear_message():
    limits = SandboxLimits(timeout_s=1.5)
    with Session([checker_image()], limits=limits) as s:
        assert s.run_code("y = 5").status == "ok"
        first_pid = s.worker_pid
        r = s.run_code("import time\ntime.sleep(30)")
        assert r.status == "timeout"
        assert "1.5 s" in r.error and "lost" in r.error
        assert not os.path.exists(f"/proc/{first_pid}")  # the worker is gone, not lingering
        r = s.run_code("print(image_1.size)\ny")
        assert r.status == "error" and r.error == "NameError: name 'y' is not defined"
        assert "(64, 48)" in r.text  # images reloaded in the fresh worker
        assert s.worker_pid != first_pid and s.restarts == 1


def test_pool_worker_is_warm_and_never_reused(pool):
    assert pool.wait_warm(120)
    warm = set(pool.live_pids())
    s1 = Session([], pool=pool)
    s1.run_code("secret = 'one'")
    assert s1.worker_pid in warm and s1.worker_was_warm is True
    pid1 = s1.worker_pid
    s1.close()
    assert pid1 not in pool.live_pids()
    with Session([], pool=pool) as s2:
        r = s2.run_code("print('secret' in dir())")
        assert s2.worker_pid != pid1
        assert r.text == format_code_result("False\n", "")


def test_cold_session_without_pool():
    with Session([]) as s:
        assert s.worker_pid is None  # lazy: no process until the first code call
        assert s.run_code("print(3)").text == format_code_result("3\n", "")
        assert s.worker_was_warm is False


def test_concurrent_sessions_do_not_share_state(pool):
    sessions = [Session([], pool=pool) for _ in range(4)]
    out = [None] * 4

    def work(i):
        sessions[i].run_code(f"v = {i}")
        out[i] = sessions[i].run_code("print(v)").text

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in sessions:
        s.close()
    assert out == [format_code_result(f"{i}\n", "") for i in range(4)]


def test_code_tool_args_and_fences(pool):
    tool = CodeTool()
    with Session([], pool=pool) as s:
        assert tool.call({"code": "```python\nprint(5)\n```"}, s).text == format_code_result("5\n", "")
        r = tool.call({}, s)
        assert r.status == "error" and "'code'" in r.error
        r = tool.call({"code": 12}, s)
        assert r.status == "error" and "int" in r.error
    assert strip_fence("print(1)") == "print(1)"


def test_session_rejects_non_images():
    with pytest.raises(ValueError, match=r"images\[0\]"):
        Session(["not an image"])


def test_isolation_report_values():
    iso = detect_isolation()
    if not (iso.drop_uid and iso.pid_ns and iso.net_ns):
        pytest.skip(f"isolation not available here: missing {iso.missing()}")
    limits = SandboxLimits(memory_mb=1500, max_processes=40)
    rep = isolation_report(limits)
    assert rep["uid_drop"] is True and rep["uid"] >= limits.uid_base
    assert rep["pid_namespace"] is True
    assert rep["net_namespace"] is True
    assert rep["mount_namespace"] is True
    assert rep["seccomp"] is (os.uname().machine == "x86_64")
    assert rep["rlimits"] == {"RLIMIT_CPU": limits.cpu_s, "RLIMIT_AS": 1500 << 20,
                              "RLIMIT_FSIZE": limits.file_size_mb << 20, "RLIMIT_NPROC": 40,
                              "RLIMIT_NOFILE": limits.max_open_files}
    assert rep["missing"] == []
    assert rep["cgroups"].startswith(("v1 (memory, pids", "v2 (memory, pids", "no: "))


def test_weaker_isolation_warns_by_name_and_still_runs(monkeypatch):
    import dataclasses

    import deepeyesv2_rollout.tools.sandbox as sandbox_module

    iso = detect_isolation()
    if not iso.drop_uid:
        pytest.skip("not root: cannot drop to an unprivileged uid here")
    weak = dataclasses.replace(iso, pid_ns=False, mount_ns=False, ipc_ns=False, uts_ns=False)
    monkeypatch.setattr(sandbox_module, "detect_isolation", lambda: weak)
    with pytest.warns(RuntimeWarning, match="missing: pid namespace, mount namespace"):
        s = Session([])
        r = s.run_code("import os\nprint(os.getuid() != 0, os.getcwd() != '/tmp')")
    workdir = s._state["worker"].workdir
    s.close()
    assert r.text == format_code_result("True True\n", "")
    assert not os.path.exists(workdir)  # the private host workdir is removed with the worker


def test_binary_stdout_is_decoded_with_bad_bytes_replaced(pool):
    with Session([], pool=pool) as s:
        r = s.run_code("import sys\nprint('a')\nsys.stdout.buffer.write(b'caf\\xc3\\xa9 \\xff!\\n')\n"
                       "sys.stderr.buffer.write('\\u00fc'.encode())\nsys.stdout.buffer.flush()\nprint('b')")
        assert r.status == "ok", r.text
        assert r.text == format_code_result("a\ncaf\u00e9 \ufffd!\nb\n", "\u00fc")


def test_lone_surrogates_and_undecodable_filenames_come_back_as_valid_text(pool):
    with Session([], pool=pool) as s:
        r = s.run_code("import os, sys\nopen(os.fsdecode(b'bad\\xffname'), 'w').close()\n"
                       "print([n for n in os.listdir('.') if n.startswith('bad')][0])\n"
                       "print('\\ud800 lone', file=sys.stderr)\nraise ValueError('\\udcff')")
        r.text.encode("utf-8")  # nothing downstream may raise on the text
        r.error.encode("utf-8")
        assert "bad\ufffdname\n" in r.text and "\ufffd lone\n" in r.text
        assert r.error == "ValueError: \ufffd"


def test_images_that_would_overflow_the_reply_frame_are_dropped_with_a_note():
    limits = SandboxLimits(timeout_s=10.0, max_reply_mb=1)
    with Session([], limits=limits) as s:
        # ~3 MB of incompressible PNG: over a 1 MB reply; the small image after it still fits.
        r = s.run_code("import numpy as np\nfrom PIL import Image\n"
                       "display(Image.fromarray(np.random.default_rng(0).integers(0, 255, (1000, 1000, 3), "
                       "dtype=np.uint8)))\ndisplay(Image.new('RGB', (4, 4)))")
        assert r.status == "ok", r.text
        assert [im.size for im in r.images] == [(4, 4)]
        assert "[1 images not returned: the reply would exceed 1 MB]" in r.text
