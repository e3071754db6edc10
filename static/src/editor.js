// The code editor: CodeMirror 6 with a language per runtime of the execute API.
import { EditorView, basicSetup } from "codemirror";
import { Compartment } from "@codemirror/state";
import { StreamLanguage } from "@codemirror/language";
import { javascript } from "@codemirror/lang-javascript";
import { python } from "@codemirror/lang-python";
import { shell } from "@codemirror/legacy-modes/mode/shell";
import { oneDark } from "@codemirror/theme-one-dark";

const LANGUAGES = {
  node: { extension: () => javascript(), sample: 'console.log("hello from", process.version);\n' },
  python: { extension: () => python(), sample: 'import sys\nprint("hello from", sys.version.split()[0])\n' },
  bash: { extension: () => StreamLanguage.define(shell), sample: 'echo "hello from $(bash --version | head -n1)"\n' },
};

export class CodeEditor {
  constructor(element, language) {
    this.language = new Compartment();
    this.view = new EditorView({
      parent: element,
      doc: LANGUAGES[language].sample,
      extensions: [basicSetup, oneDark, this.language.of(LANGUAGES[language].extension())],
    });
  }

  get code() {
    return this.view.state.doc.toString();
  }

  set code(text) {
    this.view.dispatch({ changes: { from: 0, to: this.view.state.doc.length, insert: text } });
  }

  // Switches highlighting; replaces the text only while it is still another language's sample.
  setLanguage(language) {
    const isSample = Object.values(LANGUAGES).some((l) => l.sample === this.code);
    this.view.dispatch({ effects: this.language.reconfigure(LANGUAGES[language].extension()) });
    if (isSample) this.code = LANGUAGES[language].sample;
  }
}
