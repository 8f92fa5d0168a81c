@echo off
rem Para o reprocessador de falhas.
rem Usa o Python da .venv do projeto; sem ela, o lancador py -3 (nunca o atalho da Microsoft Store).
setlocal EnableExtensions DisableDelayedExpansion
cd /d "%~dp0.."
if exist ".venv\Scripts\python.exe" goto venv
where py >nul 2>nul
if errorlevel 1 goto nopython
py -3 -m bemsoft_monitor.service stop retry
exit /b %ERRORLEVEL%
:venv
".venv\Scripts\python.exe" -m bemsoft_monitor.service stop retry
exit /b %ERRORLEVEL%
:nopython
echo Python nao encontrado: crie a .venv na pasta do projeto (py -3 -m venv .venv) ou instale o Python para todos os usuarios.
exit /b 1
