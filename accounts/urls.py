"""Sign-in pages for tenant members (the admin's login admits staff only); both forms are throttled
(accounts/signin.py)."""

from __future__ import annotations

from django.contrib.auth import views as auth_views
from django.urls import path

from accounts.signin import SignInForm

urlpatterns = [
    path("login/", auth_views.LoginView.as_view(authentication_form=SignInForm), name="login"),
    path("logout/", auth_views.LogoutView.as_view(next_page="/"), name="logout"),
]
