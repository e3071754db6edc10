// The code editor: one CodeMirror 6 view, and one editor state per open document (its text, undo
// history and selection), swapped in when its tab is shown, as CodeMirror's own docs advise.
import { EditorView, basicSetup } from "codemirror";
import { Compartment, EditorState } from "@codemirror/state";
import { keymap } from "@codemirror/view";
import { StreamLanguage } from "@codemirror/language";
import { css } from "@codemirror/lang-css";
import { html } from "@codemirror/lang-html";
import { javascript } from "@codemirror/lang-javascript";
import { json } from "@codemirror/lang-json";
import { markdown } from "@codemirror/lang-markdown";
import { python } from "@codemirror/lang-python";
import { shell } from "@codemirror/legacy-modes/mode/shell";
import { oneDark } from "@codemirror/theme-one-dark";
import { extensionOf, nameOf } from "./paths.js";

const LANGUAGES = {
  javascript: () => javascript({ jsx: true }),
  typescript: () => javascript({ jsx: true, typescript: true }),
  python: () => python(),
  shell: () => StreamLanguage.define(shell),
  json: () => json(),
  html: () => html(),
  css: () => css(),
  markdown: () => markdown(),
  text: () => [],
};

const LANGUAGE_OF_EXTENSION = {
  js: "javascript", mjs: "javascript", cjs: "javascript", jsx: "javascript",
  ts: "typescript", tsx: "typescript", mts: "typescript", cts: "typescript",
  py: "python", pyw: "python",
  sh: "shell", bash: "shell", zsh: "shell",
  json: "json", jsonc: "json", webmanifest: "json",
  html: "html", htm: "html", vue: "html", svelte: "html",
  css: "css", scss: "css", less: "css",
  md: "markdown", markdown: "markdown",
};

// The runtimes of the execute API, for the scratch document.
export const RUNTIME_LANGUAGE = { node: "javascript", python: "python", bash: "shell" };

export function languageOfName(path) {
  const name = nameOf(path).toLowerCase();
  if (name === "dockerfile" || name === "makefile") return "shell";
  return LANGUAGE_OF_EXTENSION[extensionOf(path)] ?? "text";
}

export class CodeEditor {
  // onSave: Ctrl/Cmd-S; onRun: Ctrl/Cmd-Enter; onChange(document): after any edit of the shown document.
  constructor(element, { onSave, onRun, onChange }) {
    this.onChange = onChange;
    this.shown = null;
    this.shared = [
      basicSetup,
      oneDark,
      keymap.of([
        { key: "Mod-s", preventDefault: true, run: () => (onSave(), true) },
        { key: "Mod-Enter", preventDefault: true, run: () => (onRun(), true) },
      ]),
      EditorView.updateListener.of((update) => {
        if (update.docChanged && this.shown) this.onChange(this.shown);
      }),
    ];
    this.view = new EditorView({ parent: element, state: EditorState.create({ extensions: this.shared }) });
  }

  // A document: its editor state, kept while another is shown. `saved` is the text as last read or
  // written, to tell whether it has unsaved changes.
  createDocument(text, language) {
    const compartment = new Compartment();
    const state = EditorState.create({
      doc: text,
      extensions: [...this.shared, compartment.of(LANGUAGES[language]())],
    });
    return { state, compartment, language, saved: state.doc };
  }

  show(document) {
    if (this.shown) this.shown.state = this.view.state;
    this.shown = document;
    this.view.setState(document.state);
  }

  stateOf(document) {
    return document === this.shown ? this.view.state : document.state;
  }

  isDirty(document) {
    return !this.stateOf(document).doc.eq(document.saved);
  }

  // The text as it is now, kept to mark the document saved once its write succeeds: edits made
  // while it was being written still count as unsaved.
  snapshot(document) {
    return this.stateOf(document).doc;
  }

  markSaved(document, snapshot) {
    document.saved = snapshot;
  }

  // Replaces the text (a reload from disk), as one undoable change.
  replaceText(document, text) {
    const state = this.stateOf(document);
    const transaction = state.update({ changes: { from: 0, to: state.doc.length, insert: text } });
    if (document === this.shown) this.view.dispatch(transaction);
    else document.state = transaction.state;
    document.saved = this.stateOf(document).doc;
  }

  setLanguage(document, language) {
    document.language = language;
    const effects = document.compartment.reconfigure(LANGUAGES[language]());
    if (document === this.shown) this.view.dispatch({ effects });
    else document.state = document.state.update({ effects }).state;
  }

  focus() {
    this.view.focus();
  }
}
