"""Batch inference submitted as a Ray job: logs, results, an error file, and resuming after a stop.

Submitted with ``JobSubmissionClient`` the way the README's ``ray job submit
--working-dir . -- python -m jobs.batch_infer ...`` does it.
"""

import json
import os
import time
from pathlib import Path

import httpx
import pytest
from ray.job_submission import JobStatus, JobSubmissionClient

from benchmarks.wer import word_error_rate
from monitoring.tools.profile import augmented, skimage_photos
from tests.conftest import b64, encode, rendered_words, transcode
from tests.integration.conftest import DASHBOARD_PORT
from tests.serving import ROOT

JOB_TIMEOUT_S = 300
GOOD_IMAGES = 40
CHUNK = 4


@pytest.fixture(scope="module")
def jobs(app_url):
    os.environ["RAY_AUTH_MODE"] = "token"  # as for the CLI: the client sends ~/.ray/auth_token
    return JobSubmissionClient(f"http://127.0.0.1:{DASHBOARD_PORT}")


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory, chelsea_jpeg, truncated_jpeg) -> Path:
    folder = tmp_path_factory.mktemp("images")
    (folder / "cats").mkdir()
    (folder / "cats" / "chelsea.jpg").write_bytes(chelsea_jpeg)
    for i, image in enumerate(augmented(skimage_photos(), 2, seed=3)[: GOOD_IMAGES - 1]):
        (folder / f"photo-{i:03d}.jpg").write_bytes(encode(image.convert("RGB")))
    (folder / "broken-truncated.jpg").write_bytes(truncated_jpeg)
    (folder / "broken-not-an-image.png").write_bytes(b"this is not a png")
    return folder


def submit(jobs: JobSubmissionClient, args: str) -> str:
    return jobs.submit_job(
        entrypoint=f"python -m jobs.batch_infer {args}",
        runtime_env={"working_dir": str(ROOT)},
    )


def wait(jobs: JobSubmissionClient, job_id: str, until: set[JobStatus]) -> JobStatus:
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while (status := jobs.get_job_status(job_id)) not in until:
        assert time.monotonic() < deadline, f"job {job_id} still {status}: {jobs.get_job_logs(job_id)[-2000:]}"
        time.sleep(1)
    return status


def read_parts(folder: Path) -> list[dict]:
    return [json.loads(line) for part in sorted(folder.glob("part-*.jsonl")) for line in part.open()]


def test_job_classifies_a_folder_and_writes_failures_to_the_error_file(jobs, image_folder, tmp_path):
    out = tmp_path / "out"
    job_id = submit(jobs, f"--images {image_folder} --out {out} --top-k 1 --chunk-size {CHUNK}")
    status = wait(jobs, job_id, {JobStatus.SUCCEEDED, JobStatus.FAILED})
    logs = jobs.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    assert f"{GOOD_IMAGES + 2} records, {GOOD_IMAGES} succeeded, 2 failed" in logs  # the summary line
    assert "batch_infer" in logs and "rec/s" in logs  # tqdm progress

    results = {r["id"]: r for r in read_parts(out / "results")}
    assert len(results) == GOOD_IMAGES
    assert results["cats/chelsea.jpg"]["labels"][0]["label"] == "Egyptian cat"
    errors = {e["id"]: e for e in read_parts(out / "errors")}
    assert set(errors) == {"broken-truncated.jpg", "broken-not-an-image.png"}
    assert "truncated" in errors["broken-truncated.jpg"]["reason"]
    assert "not a decodable image" in errors["broken-not-an-image.png"]["reason"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["records"] == GOOD_IMAGES + 2 and summary["failed"] == 2 and summary["models"]


def test_a_stopped_job_resumes_without_losing_or_repeating_records(jobs, image_folder, tmp_path):
    out = tmp_path / "out"
    args = f"--images {image_folder} --out {out} --top-k 1 --chunk-size {CHUNK} --concurrency 1"
    first = submit(jobs, args)
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while len(list((out / "errors").glob("part-*.jsonl"))) < 2:  # two chunks finished
        alive = jobs.get_job_status(first) in {JobStatus.PENDING, JobStatus.RUNNING}
        assert alive and time.monotonic() < deadline, jobs.get_job_logs(first)[-2000:]
        time.sleep(0.2)
    jobs.stop_job(first)
    assert wait(jobs, first, {JobStatus.STOPPED, JobStatus.SUCCEEDED, JobStatus.FAILED}) == JobStatus.STOPPED
    finished = len(list((out / "errors").glob("part-*.jsonl")))
    assert finished < (GOOD_IMAGES + 2 + CHUNK - 1) // CHUNK, "stopped too late to test a resume"

    second = submit(jobs, args)
    assert wait(jobs, second, {JobStatus.SUCCEEDED, JobStatus.FAILED}) == JobStatus.SUCCEEDED
    assert f"resumed {finished} finished chunks" in jobs.get_job_logs(second)

    result_ids = [r["id"] for r in read_parts(out / "results")]
    error_ids = [e["id"] for e in read_parts(out / "errors")]
    assert len(result_ids) == len(set(result_ids)) == GOOD_IMAGES  # none twice, none lost
    assert sorted(result_ids + error_ids) == sorted(
        str(p.relative_to(image_folder)) for p in image_folder.rglob("*") if p.is_file()
    )
    assert not list(out.rglob("*.tmp"))


def test_job_embeds_a_jsonl_file_and_reports_malformed_lines(jobs, tmp_path):
    sentences = (ROOT / "monitoring" / "samples" / "english.txt").read_text().splitlines()[:5]
    lines = [json.dumps({"id": f"s{i}", "text": s}) for i, s in enumerate(sentences)]
    lines += ["{not json", json.dumps({"id": "no-text", "body": "missing the text field"})]
    source = tmp_path / "texts.jsonl"
    source.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    job_id = submit(jobs, f"--texts {source} --out {out}")
    status = wait(jobs, job_id, {JobStatus.SUCCEEDED, JobStatus.FAILED})
    assert status == JobStatus.SUCCEEDED, jobs.get_job_logs(job_id)[-3000:]

    results = read_parts(out / "results")
    assert [r["id"] for r in results] == [f"s{i}" for i in range(5)]
    assert all(len(r["embedding"]) == 384 for r in results)
    errors = {e["id"]: e["reason"] for e in read_parts(out / "errors")}
    assert set(errors) == {str(len(sentences) + 1), "no-text"}  # the bad line is named by its line number
    assert all("'text'" in reason for reason in errors.values())


def test_job_describes_a_folder_through_the_same_graph_as_the_describe_route(jobs, tmp_path, chelsea_jpeg, app_url):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "chelsea.jpg").write_bytes(chelsea_jpeg)
    (folder / "words.png").write_bytes(encode(rendered_words("OPEN SESAME"), "PNG"))
    (folder / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    job_id = submit(jobs, f"--images {folder} --describe --out {out}")
    status = wait(jobs, job_id, {JobStatus.SUCCEEDED, JobStatus.FAILED})
    assert status == JobStatus.SUCCEEDED, jobs.get_job_logs(job_id)[-3000:]

    results = {r["id"]: r for r in read_parts(out / "results")}
    assert set(results) == {"chelsea.jpg", "words.png"}
    with httpx.Client(base_url=app_url, timeout=120) as client:  # the same description as the route gives
        route = client.post("/v1/multimodal/describe", json={"image": b64(chelsea_jpeg)}).json()
    assert results["chelsea.jpg"]["description"] == route["description"] and "cat" in route["description"].lower()
    given = route["evidence"]["classes"]
    assert results["chelsea.jpg"]["classes"] == [{"label": c["label"], "score": c["score"]} for c in given]
    assert [line["text"] for line in results["words.png"]["text"]] == ["OPEN SESAME"]
    assert "OPEN SESAME" in results["words.png"]["description"]
    errors = {e["id"]: e["reason"] for e in read_parts(out / "errors")}
    assert set(errors) == {"broken.png"} and "not a decodable image" in errors["broken.png"]
    summary = json.loads((out / "summary.json").read_text())
    assert any(model.startswith("PP-OCRv4") for model in summary["models"])


def test_job_transcribes_a_folder_of_recordings_and_a_second_run_resumes_past_them(jobs, tmp_path, librivox):
    folder = tmp_path / "recordings"
    (folder / "flac").mkdir(parents=True)
    for clip in librivox[:2]:
        (folder / f"{clip.name}.wav").write_bytes(clip.wav)
    (folder / "flac" / f"{librivox[2].name}.flac").write_bytes(transcode(librivox[2].wav, "flac"))
    (folder / "broken.mp3").write_bytes(b"ID3 but nothing after it")
    (folder / "notes.txt").write_text("not a recording, and not an audio file name: skipped")
    out = tmp_path / "out"
    args = f"--transcribe {folder} --out {out} --chunk-size 2"
    job_id = submit(jobs, args)
    status = wait(jobs, job_id, {JobStatus.SUCCEEDED, JobStatus.FAILED})
    logs = jobs.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    assert "4 records, 3 succeeded, 1 failed" in logs

    results = {r["id"]: r for r in read_parts(out / "results")}
    said = {clip.name: clip.words for clip in librivox}
    for record_id, result in results.items():
        name = Path(record_id).stem
        assert word_error_rate(said[name], result["text"]) <= 0.1, result["text"]
        assert result["language"] == "en" and result["segments"][0]["start"] == 0.0
    assert f"flac/{librivox[2].name}.flac" in results
    errors = {e["id"]: e["reason"] for e in read_parts(out / "errors")}
    assert set(errors) == {"broken.mp3"} and "cannot be read" in errors["broken.mp3"]

    again = submit(jobs, args)
    assert wait(jobs, again, {JobStatus.SUCCEEDED, JobStatus.FAILED}) == JobStatus.SUCCEEDED
    assert "this run processed 0 in" in jobs.get_job_logs(again) and "resumed 2 finished chunks" in jobs.get_job_logs(
        again
    )
    assert len(read_parts(out / "results")) == 3  # nothing written twice
