"""Error reports (the DEBUG page, admin error e-mails) with the Authorization header masked: Django's own
filter hides settings and cookies whose names look secret, but not the header that carries an API key."""

from __future__ import annotations

import re

from django.views.debug import SafeExceptionReporterFilter


class SecretHidingFilter(SafeExceptionReporterFilter):
    hidden_settings = re.compile("API|TOKEN|KEY|SECRET|PASS|SIGNATURE|HTTP_COOKIE|AUTHORIZATION", flags=re.I)
