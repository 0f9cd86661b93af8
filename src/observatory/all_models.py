"""Imports every domain's ORM models, so ``Base.metadata`` knows every table.

Alembic's autogenerate and the test fixtures use this; add each new domain's
``models`` module here.
"""

from observatory.archive import models as archive_models
from observatory.asvo import models as asvo_models
from observatory.calib import models as calib_models
from observatory.core import models as core_models
from observatory.core.database import Base
from observatory.trigger import models as trigger_models

__all__ = ["Base", "archive_models", "asvo_models", "calib_models", "core_models", "trigger_models"]
