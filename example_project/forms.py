from django import forms


class EntryForm(forms.Form):
    """The guestbook form; the name is remembered in the (cache-based) session."""

    name = forms.CharField(max_length=60)
    message = forms.CharField(max_length=280, widget=forms.Textarea(attrs={"rows": 2}))
