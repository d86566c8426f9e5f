// Runs the pinned third-party Firestore emulator (@firestore-emulator/server) on a port.
// Usage: node tools/firestore-emulator.js PORT   (prints "ready PORT" once it listens)
const { FirestoreServer } = require("@firestore-emulator/server");

const port = Number(process.argv[2]);
if (!Number.isInteger(port) || port <= 0) {
  console.error("usage: node tools/firestore-emulator.js PORT");
  process.exit(2);
}
const server = new FirestoreServer();
server.start(port).then(() => console.log(`ready ${port}`));
for (const signal of ["SIGTERM", "SIGINT"]) {
  process.on(signal, () => process.exit(0));
}
