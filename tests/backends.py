"""Which database backends a test runs on."""

import pytest

#: For tests whose subject is not the database (a conversion, a fit, its plots): SQLite
#: alone. Their PostgreSQL variant repeated seconds of numerical work and tested nothing
#: more; the services' database behaviour is tested on both backends elsewhere.
sqlite_only = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
