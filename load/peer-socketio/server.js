'use strict';
// The load peer: a minimal, typical Socket.IO v4 server doing the same DM and group relay as
// Palaver, so palaver-load can drive both with the same workload. Default Socket.IO settings,
// one process (no cluster), no artificial delays. It keeps nothing on disk: a message is relayed
// and acknowledged from memory (Palaver commits it to its store first).
//
// Protocol (Socket.IO v4 over Engine.IO v4): the subset of the Syarah dialect (seed 001) that
// the load workloads use, so palaver-load drives Palaver (namespace `/`) and this peer with the
// same frames:
//   connect with auth {token}: an HS256 JWT whose `sub` is the user;
//   emit `joinRoom` {chatHeaderId} or {otherUserId} with an ack -> {chatHeaderId, joined};
//     an unknown chatHeaderId is a new room (there is no store);
//   emit `createMessage` {chatHeaderId, message, messageType: 0, clientRef} with an ack ->
//     the chat message {id, chatHeaderId, userId, message, messageType, seq, creationTime}
//     (or {error});
//   every socket in the room, the sender's included, gets `message`
//     {chatHeaderId, chatMessage}.
// Environment: PORT (default 3000), HOST (default 127.0.0.1), JWT_SECRET (required).

const http = require('http');
const { Server } = require('socket.io');
const jwt = require('jsonwebtoken');

const port = Number(process.env.PORT || 3000);
const host = process.env.HOST || '127.0.0.1';
const secret = process.env.JWT_SECRET;
if (!secret) {
  console.error('JWT_SECRET is required');
  process.exit(2);
}

const httpServer = http.createServer();
const io = new Server(httpServer);

io.use((socket, next) => {
  const token = socket.handshake.auth && socket.handshake.auth.token;
  try {
    const claims = jwt.verify(token, secret, { algorithms: ['HS256'] });
    if (typeof claims.sub !== 'string' || claims.sub === '') {
      throw new Error('no sub');
    }
    socket.data.user = claims.sub;
    next();
  } catch (e) {
    next(new Error('unauthorized'));
  }
});

let nextId = 1;
let nextRoom = 1;
const seqs = new Map();
const pairs = new Map();

function answer(ack, value) {
  if (typeof ack === 'function') {
    ack(value);
  }
}

function roomOfPair(a, b) {
  const key = a < b ? `${a}\u0000${b}` : `${b}\u0000${a}`;
  if (!pairs.has(key)) {
    pairs.set(key, nextRoom++);
  }
  return pairs.get(key);
}

io.on('connection', (socket) => {
  socket.on('joinRoom', (arg, ack) => {
    let room = arg && arg.chatHeaderId;
    const other = arg && arg.otherUserId;
    if (room === undefined && typeof other === 'string' && other !== '') {
      room = roomOfPair(socket.data.user, other);
    }
    if (typeof room !== 'number' && typeof room !== 'string') {
      return answer(ack, { error: 'chatHeaderId or otherUserId is required' });
    }
    socket.join(String(room));
    answer(ack, { chatHeaderId: room, joined: true });
  });

  socket.on('createMessage', (arg, ack) => {
    const room = arg && arg.chatHeaderId;
    const text = arg && arg.message;
    if ((typeof room !== 'number' && typeof room !== 'string') || typeof text !== 'string') {
      return answer(ack, { error: 'chatHeaderId and message are required' });
    }
    if (!socket.rooms.has(String(room))) {
      return answer(ack, { error: 'not a member of this chat' });
    }
    const seq = (seqs.get(room) || 0) + 1;
    seqs.set(room, seq);
    const chatMessage = {
      id: nextId++,
      chatHeaderId: room,
      userId: socket.data.user,
      message: text,
      messageType: 0,
      seq,
      creationTime: new Date().toISOString(),
    };
    answer(ack, chatMessage);
    io.to(String(room)).emit('message', { chatHeaderId: room, chatMessage });
  });
});

httpServer.listen(port, host, () => {
  console.log(`peer-socketio listening on ${host}:${port}`);
});

function stop() {
  io.close(() => process.exit(0));
}
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
