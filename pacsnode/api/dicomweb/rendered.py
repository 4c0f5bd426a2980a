"""WADO-RS rendered resources and thumbnails (PS3.18 §10.4.1.1.3, §10.4.1.1.4):
a frame as a windowed 8-bit JPEG (default) or PNG.

Grey-scale frames go through the Modality LUT (Rescale Slope/Intercept),
then a linear window: the ``window=center,width`` query parameter, else the
instance's first Window Center/Width, else the frame's minimum and maximum.
MONOCHROME1 is inverted. A thumbnail is the rendered middle instance of a
series (a study: of its first series with pixel data), at most
``dicomweb.thumbnail_size`` pixels on its longer edge.
"""

from __future__ import annotations

from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import APIRouter, Request, Response
from PIL import Image
from pydicom import dcmread

from pacsnode.api.deps import EngineDep, ReadDep, SettingsDep
from pacsnode.api.dicomweb.common import RENDERED_TYPES, locate, parse_accept, record, spool_path
from pacsnode.api.dicomweb.wado import frame_numbers
from pacsnode.core.errors import InvalidQuery, NotAcceptable, NotFound
from pacsnode.db.qr import StoredInstance

router = APIRouter(tags=["dicomweb"])


def rendered_type(accept: str | None) -> str:
    for rng in parse_accept(accept):
        for media in RENDERED_TYPES:
            if rng.matches(media):
                return media
    raise NotAcceptable(f"rendered images are {' or '.join(RENDERED_TYPES)}")


def _window(text: str | None) -> tuple[float, float] | None:
    if not text:
        return None
    try:
        center, width = (float(v) for v in text.split(",")[:2])
    except ValueError:
        raise InvalidQuery("window is center,width[,function] in numbers") from None
    if width <= 0:
        raise InvalidQuery("window width must be positive")
    return center, width


def _first(value: Any) -> float:
    try:
        return float(value[0])
    except TypeError:
        return float(value)


def render(
    path: Path,
    frame: int,
    media: str,
    *,
    window: tuple[float, float] | None = None,
    max_size: int | None = None,
) -> bytes:
    """Frame ``frame`` (from 1) of a stored instance as ``media``."""
    from pydicom.pixels import apply_modality_lut, pixel_array

    try:
        ds = dcmread(path)
    except Exception as exc:
        raise NotFound(f"a stored instance cannot be read: {type(exc).__name__}") from None
    if "PixelData" not in ds:
        raise NotAcceptable("the instance has no pixel data to render")
    count = int(ds.get("NumberOfFrames") or 1)
    if frame > count:
        raise NotFound(f"the instance has {count} frame(s)")
    try:
        array = pixel_array(ds, index=frame - 1)
    except Exception as exc:
        raise NotAcceptable(f"the pixel data cannot be decoded: {type(exc).__name__}") from None
    if array.ndim == 2:
        values = apply_modality_lut(array, ds).astype(np.float64)
        if window is None and "WindowCenter" in ds and "WindowWidth" in ds:
            window = (_first(ds.WindowCenter), _first(ds.WindowWidth))
        if window is None:
            low, high = float(values.min()), float(values.max())
        else:
            low, high = window[0] - window[1] / 2, window[0] + window[1] / 2
        scaled = (values - low) / max(high - low, 1e-9)
        image8 = (np.clip(scaled, 0, 1) * 255).astype(np.uint8)
        if ds.get("PhotometricInterpretation") == "MONOCHROME1":
            image8 = 255 - image8
        image = Image.fromarray(image8, mode="L")
    else:
        if array.dtype != np.uint8:
            array = (array / max(float(array.max()), 1.0) * 255).astype(np.uint8)
        image = Image.fromarray(array[..., :3], mode="RGB")
    if max_size:
        image.thumbnail((max_size, max_size))
    out = BytesIO()
    image.save(out, format="JPEG" if media == "image/jpeg" else "PNG", quality=90)
    return out.getvalue()


def _preview(settings: Any, found: list[StoredInstance], media: str, size: int | None) -> bytes:
    """The middle instance of the first series that renders."""
    by_series: dict[str, list[StoredInstance]] = {}
    for stored in found:
        by_series.setdefault(stored.series_instance_uid, []).append(stored)
    for members in by_series.values():
        middle = members[len(members) // 2]
        try:
            return render(spool_path(settings, middle), 1, media, max_size=size)
        except NotAcceptable:
            continue
    raise NotAcceptable("nothing here has pixel data to render")


def _image(
    request: Request,
    principal: Any,
    settings: Any,
    engine: Any,
    study: str,
    series: str | None,
    instance: str | None,
    frame: int | None,
    thumbnail: bool,
) -> Response:
    media = rendered_type(request.headers.get("accept"))
    found = locate(engine, study, series, instance)
    size = settings.dicomweb.thumbnail_size if thumbnail else None
    if instance is None:
        body = _preview(settings, found, media, size)
    else:
        window = _window(request.query_params.get("window"))
        body = render(
            spool_path(settings, found[0]), frame or 1, media, window=window, max_size=size
        )
    action = "dicomweb.thumbnail" if thumbnail else "dicomweb.rendered"
    record(engine, principal, request, action, study)
    return Response(body, media_type=media)


def _routes() -> None:
    instance = "/studies/{study}/series/{series}/instances/{instance}"
    for kind in ("rendered", "thumbnail"):
        thumb = kind == "thumbnail"

        def of_instance(
            request: Request,
            principal: ReadDep,
            settings: SettingsDep,
            engine: EngineDep,
            study: str,
            series: str,
            instance: str,
            thumb: bool = thumb,
        ) -> Response:
            return _image(
                request, principal, settings, engine, study, series, instance, None, thumb
            )

        def of_frame(
            request: Request,
            principal: ReadDep,
            settings: SettingsDep,
            engine: EngineDep,
            study: str,
            series: str,
            instance: str,
            frames: str,
            thumb: bool = thumb,
        ) -> Response:
            numbers = frame_numbers(frames)
            return _image(
                request, principal, settings, engine, study, series, instance, numbers[0], thumb
            )

        router.add_api_route(
            f"{instance}/{kind}",
            of_instance,
            methods=["GET"],
            response_class=Response,
            summary=f"WADO-RS: {kind} instance",
        )
        router.add_api_route(
            f"{instance}/frames/{{frames}}/{kind}",
            of_frame,
            methods=["GET"],
            response_class=Response,
            summary=f"WADO-RS: {kind} frame",
        )

    def series_thumbnail(
        request: Request,
        principal: ReadDep,
        settings: SettingsDep,
        engine: EngineDep,
        study: str,
        series: str,
    ) -> Response:
        return _image(request, principal, settings, engine, study, series, None, None, True)

    def study_thumbnail(
        request: Request,
        principal: ReadDep,
        settings: SettingsDep,
        engine: EngineDep,
        study: str,
    ) -> Response:
        return _image(request, principal, settings, engine, study, None, None, None, True)

    router.add_api_route(
        "/studies/{study}/series/{series}/thumbnail",
        series_thumbnail,
        methods=["GET"],
        response_class=Response,
        summary="WADO-RS: thumbnail of a series",
    )
    router.add_api_route(
        "/studies/{study}/thumbnail",
        study_thumbnail,
        methods=["GET"],
        response_class=Response,
        summary="WADO-RS: thumbnail of a study",
    )


_routes()
