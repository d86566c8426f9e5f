// Runs the pinned third-party Firestore emulator (@firestore-emulator/server) on a port.
// Usage: node tools/firestore-emulator.js PORT   (prints "ready PORT" once it listens)
//
// One shim, for the Listen protocol: the package serves only the first request of a Listen
// stream (`call.once("data")`) and has no remove_target. Firestore lets a client add and remove
// targets on an open stream, and our client does: a stream emptied by a remove_target takes
// the next watch's add_target (issue 23: a user online after another went offline never got
// a sync). Here every add_target is served by the package's own Listen code, on a one-target
// call of its own; remove_target (and the stream's end or cancellation) ends that call, which
// unhooks its query, and is acknowledged with a REMOVE as Firestore does.
const { EventEmitter } = require("node:events");
const path = require("node:path");

const here = { paths: [path.dirname(require.resolve("@firestore-emulator/server"))] };
const grpc = require(require.resolve("@grpc/grpc-js", here));
const v1 = require(require.resolve("@firestore-emulator/proto/dist/google/firestore/v1/firestore", here));
const { FirestoreServer } = require("@firestore-emulator/server");

function listenToEveryTarget(listenToOne) {
  return (call) => {
    const targets = new Map(); // target id -> the one-target call the package serves
    const end = (id) => {
      const one = targets.get(id);
      if (one === undefined) return;
      targets.delete(id);
      one.ended = true;
      one.emit("end"); // the package unhooks the target's query on it
    };
    const send = (response) => {
      if (!call.cancelled && !call.destroyed && !call.writableEnded) call.write(response);
    };
    call.on("data", (request) => {
      if (request.has_add_target) {
        const id = request.add_target.target_id;
        end(id);
        const one = new EventEmitter();
        one.ended = false;
        one.write = (response) => one.ended || send(response); // nothing after its removal
        one.end = () => end(id);
        targets.set(id, one);
        listenToOne(one);
        one.emit("data", request);
      } else if (request.has_remove_target && targets.has(request.remove_target)) {
        end(request.remove_target);
        const removed = { target_change_type: v1.TargetChangeTargetChangeType.REMOVE, target_ids: [request.remove_target] };
        send(v1.ListenResponse.fromObject({ target_change: removed }));
      }
    });
    for (const event of ["end", "cancelled", "close"]) {
      call.once(event, () => [...targets.keys()].forEach(end));
    }
  };
}

// The package registers its service in FirestoreServer's constructor: wrap its Listen there.
const addService = grpc.Server.prototype.addService;
grpc.Server.prototype.addService = function (service, implementation) {
  if (service.Listen !== undefined && typeof implementation.Listen === "function") {
    implementation.Listen = listenToEveryTarget(implementation.Listen.bind(implementation));
  }
  return addService.call(this, service, implementation);
};

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
