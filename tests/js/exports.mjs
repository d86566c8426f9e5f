// The values the package's declarations promise, and the values its module exports: printed
// as JSON for tests/test_js_package.py, which requires the two lists to be equal.
// Usage: node exports.mjs <package dir> (its dist/ built by `npm pack`).
import { join } from "node:path";
import { pathToFileURL } from "node:url";
import ts from "typescript";

const dir = process.argv[2];
const declarations = join(dir, "dist", "listeners-client.d.ts");
const options = {
  strict: true,
  noEmit: true,
  types: [],
  target: ts.ScriptTarget.ES2022,
  lib: ["lib.es2022.d.ts", "lib.dom.d.ts"],
};
const program = ts.createProgram([declarations], options);
const checker = program.getTypeChecker();
const file = program.getSourceFile(declarations);
const exported = checker.getExportsOfModule(checker.getSymbolAtLocation(file));
const declared = exported
  .filter((symbol) => symbol.flags & ts.SymbolFlags.Value)
  .map((symbol) => symbol.name)
  .sort();
const diagnostics = ts.getPreEmitDiagnostics(program).map((d) => ts.flattenDiagnosticMessageText(d.messageText, "\n"));
const module = await import(pathToFileURL(join(dir, "dist", "listeners-client.js")).href);
console.log(JSON.stringify({ declared, exported: Object.keys(module).sort(), diagnostics }));
