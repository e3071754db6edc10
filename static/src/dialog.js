// Questions to the user in the page's own <dialog> (modal, Escape cancels), not window.prompt.
const $ = (id) => document.getElementById(id);

// Resolves to the text typed (or true, with no `value`), or null when cancelled.
export function ask(message, { value, confirm = "OK", danger = false } = {}) {
  const dialog = $("dialog");
  const input = $("dialog-input");
  $("dialog-message").textContent = message;
  $("dialog-confirm").textContent = confirm;
  $("dialog-confirm").classList.toggle("danger", danger);
  input.hidden = value === undefined;
  input.value = value ?? "";
  return new Promise((resolve) => {
    dialog.addEventListener(
      "close",
      () => resolve(dialog.returnValue === "confirm" ? (value === undefined ? true : input.value.trim() || null) : null),
      { once: true },
    );
    dialog.returnValue = "";
    dialog.showModal();
    if (value !== undefined) {
      input.focus();
      // The name without its extension is what one usually changes.
      const dot = input.value.lastIndexOf(".");
      input.setSelectionRange(0, dot > 0 ? dot : input.value.length);
    }
  });
}
