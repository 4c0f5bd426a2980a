"""Synthetic phantom studies with real geometry, written as DICOM or kept in memory.

Synthetic data, for testing and demonstration only. Seeded and reproducible:
the same seed gives the same pixel data and the same UIDs. Modules:

- :mod:`~models.phantom.geometry`: voxel grids in patient space;
- :mod:`~models.phantom.shapes`: solid shapes and their rasterisation;
- :mod:`~models.phantom.anatomy`: tissues, their CT/PET/MR properties, organs;
- :mod:`~models.phantom.lesions`: lesions (ground truth) and physiological PET foci;
- :mod:`~models.phantom.imaging`: CT in HU, PET in SUV, MR spin-echo signal;
- :mod:`~models.phantom.dicom`: CT, PET and MR Image Storage data sets;
- :mod:`~models.phantom.study`: study specs, in-memory studies, study folders with
  ground truth;
- :mod:`~models.phantom.series`: one CT series from a small spec (the first API);
- :mod:`~models.phantom.send`: sending a study with C-STORE.
"""

from pacsnode.lab.phantom.anatomy import Tissue
from pacsnode.lab.phantom.dicom import SeriesImage, StudyHeader, series_datasets
from pacsnode.lab.phantom.lesions import Focus, Lesion
from pacsnode.lab.phantom.series import (
    SeriesSpec,
    ct_phantom_volume,
    ct_series_datasets,
    write_ct_series,
)
from pacsnode.lab.phantom.study import (
    MASKS_FILE,
    TRUTH_FILE,
    Study,
    StudySpec,
    WrittenStudy,
    generate_study,
    study_datasets,
    write_study,
)
from pacsnode.workers.geometry import Grid

__all__ = [
    "MASKS_FILE",
    "TRUTH_FILE",
    "Focus",
    "Grid",
    "Lesion",
    "SeriesImage",
    "SeriesSpec",
    "Study",
    "StudyHeader",
    "StudySpec",
    "Tissue",
    "WrittenStudy",
    "ct_phantom_volume",
    "ct_series_datasets",
    "generate_study",
    "series_datasets",
    "study_datasets",
    "write_ct_series",
    "write_study",
]
