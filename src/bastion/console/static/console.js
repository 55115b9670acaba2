// The admin console's only script: asks before destructive forms, copies a new key.
// Served from Bastion itself (CSP script-src 'self'); pages work without it.
"use strict";

document.addEventListener("submit", (event) => {
  const form = event.target;
  const question = form instanceof HTMLFormElement ? form.dataset.confirm : undefined;
  if (question && !window.confirm(question)) {
    event.preventDefault();
  }
});

document.addEventListener("click", (event) => {
  const button = event.target instanceof Element ? event.target.closest("[data-copy]") : null;
  if (!button || !navigator.clipboard) {
    return;
  }
  const source = document.getElementById(button.dataset.copy);
  if (source) {
    navigator.clipboard.writeText(source.textContent.trim()).then(() => {
      button.textContent = "Copied";
    });
  }
});
