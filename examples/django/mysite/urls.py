from django.contrib import admin
from django.urls import path
from pages import views

urlpatterns = [
    path("", views.hello, name="hello"),
    path("page", views.page, name="page"),
    path("admin/", admin.site.urls),
]
