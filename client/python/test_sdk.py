"""The Python SDK against a live agent: test/e2e/python-sdk.test.ts runs it in the VM.

    PYTHONPATH=<generate.sh's OUTDIR> /usr/bin/python3 client/python/test_sdk.py FIRST SECOND

FIRST and SECOND are images of the agent's bucket that nobody pulled yet, SECOND sharing leading
layers with FIRST (the e2e bucket's python and node). The agent must have no activations of
them. The steps run in order, each on what the previous ones left; each prints "ok <step>", a
failure prints its traceback and exits 1.
"""
import datetime
import sys
import traceback

import grpc
from google.protobuf import timestamp_pb2

import imgd_sdk
from imgd_sdk import pb

stub = imgd_sdk.connect()
FIRST, SECOND = sys.argv[1], sys.argv[2]
MISSING = "no-such-image-in-the-bucket"
SDK_LABELS = {"owner": "python-sdk-test", "tier.name": "e2e"}
state = {}


def fails(call, code, reason, **metadata):
    """Runs call(), which must fail with `code` and an ErrorInfo of domain imgd and `reason`
    whose metadata hold `metadata`."""
    try:
        result = call()
    except grpc.RpcError as err:
        assert err.code() == code, f"{err.code()} {err.details()}, expected {code}"
        info = imgd_sdk.error_info(err)
        assert info is not None, f"no ErrorInfo in the status details of {err.code()} {err.details()}"
        assert (info.domain, info.reason) == ("imgd", reason), f"ErrorInfo {info.domain}/{info.reason}, expected imgd/{reason}"
        for key, value in metadata.items():
            assert info.metadata.get(key) == value, f"ErrorInfo metadata {dict(info.metadata)} lacks {key}={value}"
        return info
    raise AssertionError(f"expected {code}/{reason}, the call answered {result}")


def recent(ts):
    """A Timestamp message set to a time within the last hour (the agent shares our clock)."""
    assert isinstance(ts, timestamp_pb2.Timestamp), type(ts)
    age = datetime.datetime.now(datetime.timezone.utc) - ts.ToDatetime(tzinfo=datetime.timezone.utc)
    assert datetime.timedelta(minutes=-5) < age < datetime.timedelta(hours=1), f"timestamp {ts.ToJsonString()} is not recent"


PHASE_ORDER = [pb.LAYER_PHASE_PENDING, pb.LAYER_PHASE_DOWNLOADING, pb.LAYER_PHASE_APPLYING, pb.LAYER_PHASE_DONE]


def pull(image):
    """Pulls image, checking the stream's per-layer progress; returns the messages."""
    messages = list(stub.PullImage(pb.PullImageRequest(image=image)))
    assert messages, "the stream sent no message"
    *running, last = messages
    assert all(m.status == pb.RUN_STATUS_RUNNING for m in running), [pb.RunStatus.Name(m.status) for m in running]
    assert last.status == pb.RUN_STATUS_SUCCEEDED, pb.RunStatus.Name(last.status)
    assert last.run_id and last.image.name == image and last.image.state == pb.IMAGE_STATE_READY
    count = len(last.image.layers)
    # Every message lists every layer, in order; a first message sent before the agent has
    # listed the image's layers may have none.
    first_with_layers = next(i for i, m in enumerate(messages) if m.layers)
    assert not any(m.layers for m in messages[:first_with_layers])
    messages = messages[first_with_layers:]
    for m in messages:
        assert [l.position for l in m.layers] == list(range(1, count + 1)), f"layers of a message: {[l.position for l in m.layers]}, image has {count}"
        assert m.bytes_done <= m.bytes_total or m.bytes_total == 0, (m.bytes_done, m.bytes_total)
        for l in m.layers:
            assert l.bytes_done <= l.bytes_total or l.bytes_total == 0, l
    for position in range(count):
        phases = [m.layers[position].phase for m in messages]
        if pb.LAYER_PHASE_REUSED in phases:
            assert set(phases) <= {pb.LAYER_PHASE_PENDING, pb.LAYER_PHASE_REUSED} and phases[-1] == pb.LAYER_PHASE_REUSED, phases
            continue
        assert all(p in PHASE_ORDER for p in phases), phases
        ranks = [PHASE_ORDER.index(p) for p in phases]
        assert ranks == sorted(ranks), f"layer {position + 1} went back: {[pb.LayerPhase.Name(p) for p in phases]}"
        assert phases[-1] == pb.LAYER_PHASE_DONE, pb.LayerPhase.Name(phases[-1])
    assert [l.digest for l in last.layers] == [l.digest for l in last.image.layers], "the last message's digests are the image's"
    return messages


def step_version():
    version = stub.GetVersion(pb.GetVersionRequest())
    assert version.api == "imgd.v1" and version.version, version


def step_pull_first():
    messages = pull(FIRST)
    layers = len(messages[-1].layers)
    # Nothing of FIRST was on this host: every layer is downloaded and applied, with progress.
    for position in range(layers):
        seen = {m.layers[position].phase for m in messages}
        assert {pb.LAYER_PHASE_DOWNLOADING, pb.LAYER_PHASE_APPLYING} <= seen, f"layer {position + 1}: {sorted(pb.LayerPhase.Name(p) for p in seen)}"
    assert any(0 < m.bytes_done < m.bytes_total for m in messages), "no message between start and end"
    state["first"] = messages[-1].image


def step_pull_second_reuses_shared_layers():
    messages = pull(SECOND)
    first, second = state["first"].layers, messages[-1].image.layers
    shared = 0
    while shared < min(len(first), len(second)) and first[shared].digest == second[shared].digest:
        shared += 1
    assert 0 < shared < len(second), f"{SECOND} must share leading layers with {FIRST} and have its own"
    final = [l.phase for l in messages[-1].layers]
    expected = [pb.LAYER_PHASE_REUSED] * shared + [pb.LAYER_PHASE_DONE] * (len(second) - shared)
    assert final == expected, [pb.LayerPhase.Name(p) for p in final]
    assert messages[-1].image.layers[shared - 1].thin_id == state["first"].layers[shared - 1].thin_id


def step_timestamps():
    image = stub.GetImage(pb.GetImageRequest(image=FIRST)).image
    assert image.HasField("updated_at")
    recent(image.updated_at)


def step_activate_idempotent():
    request = pb.ActivateImageRequest(image=FIRST, name="python-sdk-a", labels=SDK_LABELS)
    a = stub.ActivateImage(request).activation
    again = stub.ActivateImage(request).activation
    assert a.id and again.id == a.id, (a.id, again.id)
    assert again.device_path == a.device_path and again.thin_id == a.thin_id
    assert a.name == "python-sdk-a" and dict(a.labels) == SDK_LABELS, a
    recent(a.created_at)
    b = stub.ActivateImage(pb.ActivateImageRequest(image=SECOND, name="python-sdk-b")).activation
    assert b.id != a.id
    fails(lambda: stub.ActivateImage(pb.ActivateImageRequest(image=SECOND, name="python-sdk-a")),
          grpc.StatusCode.ALREADY_EXISTS, "ACTIVATION_NAME_TAKEN")
    state["activations"] = {a.id, b.id}


def walk(list_call, request_type, items, **filters):
    """Every page of a List call at page_size=1: the items in order, and how many pages."""
    found, pages, token = [], 0, ""
    while True:
        page = list_call(request_type(page_size=1, page_token=token, **filters))
        pages += 1
        assert len(getattr(page, items)) <= 1, f"page_size=1 answered {len(getattr(page, items))}"
        found += getattr(page, items)
        token = page.next_page_token
        if not token:
            return found, pages
        assert pages < 100, "paging does not end"


def step_paging():
    images, pages = walk(stub.ListImages, pb.ListImagesRequest, "images")
    all_images = stub.ListImages(pb.ListImagesRequest()).images
    assert [i.name for i in images] == [i.name for i in all_images], "paging sees what one call sees"
    assert {FIRST, SECOND} <= {i.name for i in images} and pages >= len(images) >= 2
    activations, pages = walk(stub.ListActivations, pb.ListActivationsRequest, "activations")
    assert [a.id for a in activations] == [a.id for a in stub.ListActivations(pb.ListActivationsRequest()).activations]
    assert state["activations"] <= {a.id for a in activations} and pages >= len(activations) >= 2
    only_first, _ = walk(stub.ListActivations, pb.ListActivationsRequest, "activations", image=FIRST)
    assert {a.image for a in only_first} == {FIRST}
    fails(lambda: stub.ListImages(pb.ListImagesRequest(page_size=-1)), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
    fails(lambda: stub.ListImages(pb.ListImagesRequest(page_token="not-a-token-of-the-agent")), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")


def step_deactivate():
    by_name = stub.DeactivateImage(pb.DeactivateImageRequest(name="python-sdk-a")).activation
    assert by_name.name == "python-sdk-a" and by_name.id in state["activations"]
    stub.DeactivateImage(pb.DeactivateImageRequest(name="python-sdk-a", allow_missing=True))
    fails(lambda: stub.DeactivateImage(pb.DeactivateImageRequest(activation_id=by_name.id)),
          grpc.StatusCode.NOT_FOUND, "ACTIVATION_NOT_FOUND")
    other = (state["activations"] - {by_name.id}).pop()
    stub.DeactivateImage(pb.DeactivateImageRequest(activation_id=other))
    left = {a.id for a in stub.ListActivations(pb.ListActivationsRequest()).activations}
    assert not left & state["activations"], "deactivated activations are still listed"


def step_missing_image():
    fails(lambda: stub.GetImage(pb.GetImageRequest(image=MISSING)), grpc.StatusCode.NOT_FOUND, "IMAGE_NOT_FOUND", image=MISSING)
    fails(lambda: list(stub.PullImage(pb.PullImageRequest(image=MISSING))), grpc.StatusCode.NOT_FOUND, "IMAGE_NOT_FOUND", image=MISSING)
    # The failed pull leaves no image behind.
    fails(lambda: stub.GetImage(pb.GetImageRequest(image=MISSING)), grpc.StatusCode.NOT_FOUND, "IMAGE_NOT_FOUND")
    assert MISSING not in {i.name for i in stub.ListImages(pb.ListImagesRequest()).images}


STEPS = [step_version, step_pull_first, step_pull_second_reuses_shared_layers, step_timestamps,
         step_activate_idempotent, step_paging, step_deactivate, step_missing_image]

if __name__ == "__main__":
    for step in STEPS:
        try:
            step()
        except Exception:
            traceback.print_exc()
            print(f"FAILED {step.__name__}")
            sys.exit(1)
        print(f"ok {step.__name__}", flush=True)
    print(f"python sdk: {len(STEPS)} steps passed")
