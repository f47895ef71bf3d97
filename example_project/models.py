from django.db import models


class Entry(models.Model):
    """One guestbook entry: who wrote it, what, and when."""

    name = models.CharField(max_length=60)
    message = models.CharField(max_length=280)
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created", "-id"]
        verbose_name_plural = "entries"

    def __str__(self) -> str:
        return f"{self.name}: {self.message[:30]}"
